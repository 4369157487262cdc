"""detect-custom-ops: the census of standard, contrib, known and unknown ops in any domain."""

from __future__ import annotations

import onnx
import pytest
import toymodels

from qdqkit.errors import UserError
from qdqkit.model import ModelHandle
from qdqkit.pass_infra import PassContext


def _run(session, model, tmp_path, **options):
    cls = session.passes.get("detect-custom-ops")
    ctx = PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=tmp_path)
    handle = ModelHandle(model)
    before = model.SerializeToString()
    result = cls(cls.make_options(options)).run(handle, ctx)
    assert handle.proto.SerializeToString() == before and result.modified is False
    return result, ctx.state["detect-custom-ops"]


def test_census_in_default_custom_and_trt_domains(toy_session, tmp_path):
    model = toymodels.plugin_model()
    model.graph.node[3].domain = "trt.plugins"  # one ToyScaleTRT already moved
    model.opset_import.append(onnx.helper.make_opsetid("trt.plugins", 1))
    result, census = _run(toy_session, model, tmp_path)
    nodes = census["nodes"]
    assert nodes["block0/toyscale"] == {"class": "known-custom", "domain": "trt.plugins", "op_type": "ToyScaleTRT",
                                        "spec": "ai.onnx::ToyScaleTRT"}
    assert nodes["block1/toyscale"]["domain"] == "" and nodes["block1/toyscale"]["class"] == "known-custom"
    assert nodes["head/rowmean"]["spec"] == "toy.ops::ToyRowMeanTRT"
    assert nodes["head/gemm"]["class"] == "standard"
    assert result.stats["counts"] == {"standard": len(model.graph.node) - 3, "contrib": 0, "known-custom": 3,
                                      "unknown-custom": 0}


def test_unknown_and_contrib(toy_session, tmp_path):
    model = toymodels.plugin_model()
    model.graph.node.append(onnx.helper.make_node("FusedMatMul", ["x", "x"], ["fm"], domain="com.microsoft",
                                                  name="contrib"))
    model.graph.node.append(onnx.helper.make_node("SecretOp", ["x"], ["so"], domain="vendor.x", name="vendor"))
    model.graph.node.append(onnx.helper.make_node("BlobTRT", ["x"], ["bl"], name="blob"))
    result, census = _run(toy_session, model, tmp_path)
    assert census["nodes"]["contrib"]["class"] == "contrib"
    assert census["nodes"]["vendor"]["class"] == "unknown-custom"
    assert census["nodes"]["blob"]["class"] == "unknown-custom"
    assert result.stats["unknown"] == ["BlobTRT", "vendor.x::SecretOp"]
    with pytest.raises(UserError, match="without a spec: BlobTRT, vendor.x::SecretOp"):
        _run(toy_session, model, tmp_path, fail_on_unknown=True)


def test_alias_domain_and_subgraphs(toy_session, tmp_path):
    model = toymodels.plugin_model(rowmean_domain="toy.legacy")
    model.graph.node[-3].op_type = "ToyRowMean"  # the alias name
    then = onnx.helper.make_graph([onnx.helper.make_node("ToyScaleTRT", ["x"], ["t"], name="inner")], "then", [],
                                  [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1, 8, 16])])
    model.graph.node.append(onnx.helper.make_node("If", ["cond"], ["out_if"], then_branch=then, else_branch=then,
                                                  name="branch"))
    _, census = _run(toy_session, model, tmp_path)
    assert census["nodes"]["head/rowmean"]["spec"] == "toy.ops::ToyRowMeanTRT"
    assert census["nodes"]["inner"]["class"] == "known-custom"
