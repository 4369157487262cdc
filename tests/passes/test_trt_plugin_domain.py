"""trt-plugin-domain: custom ops into trt.plugins with opset 1, restricted by op type, and back."""

from __future__ import annotations

import pytest
import toymodels

from qdqkit.errors import UserError
from qdqkit.model import ModelHandle
from qdqkit.pass_infra import PassContext


def _ctx(session, tmp_path):
    return PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=tmp_path)


def _run(session, handle, ctx, **options):
    for name, opts in (("detect-custom-ops", {}), ("trt-plugin-domain", options)):
        cls = session.passes.get(name)
        result = cls(cls.make_options(opts)).run(handle, ctx)
    return result


def _domains(proto):
    return {n.name: n.domain for n in proto.graph.node}, {o.domain: o.version for o in proto.opset_import}


def test_moves_custom_ops_and_fixes_opsets(toy_session, tmp_path):
    handle, ctx = ModelHandle(toymodels.plugin_model()), _ctx(toy_session, tmp_path)
    result = _run(toy_session, handle, ctx)
    nodes, opsets = _domains(handle.proto)
    assert result.modified and result.stats["moved"] == {"ToyScaleTRT": 2, "ToyRowMeanTRT": 1}
    assert nodes["block0/toyscale"] == nodes["head/rowmean"] == "trt.plugins"
    assert nodes["head/gemm"] == ""
    assert opsets == {"": 17, "trt.plugins": 1}  # toy.ops is unused now and dropped
    again = _run(toy_session, handle, ctx)
    assert again.modified is False


def test_restricted_to_op_types_and_inverse(toy_session, tmp_path):
    handle, ctx = ModelHandle(toymodels.plugin_model()), _ctx(toy_session, tmp_path)
    _run(toy_session, handle, ctx, op_types=["ToyRowMeanTRT"])
    nodes, opsets = _domains(handle.proto)
    assert nodes["head/rowmean"] == "trt.plugins" and nodes["block0/toyscale"] == ""
    assert opsets == {"": 17, "trt.plugins": 1}
    cls = toy_session.passes.get("trt-plugin-domain")
    back = cls(cls.make_options({"inverse": True})).run(handle, ctx)
    nodes, opsets = _domains(handle.proto)
    assert back.modified and nodes["head/rowmean"] == "toy.ops"
    assert opsets == {"": 17, "toy.ops": 1}
    assert handle.proto.SerializeToString() == ModelHandle(toymodels.plugin_model()).proto.SerializeToString()


def test_inverse_without_history_uses_the_spec_domain(toy_session, tmp_path):
    handle, ctx = ModelHandle(toymodels.plugin_model()), _ctx(toy_session, tmp_path)
    _run(toy_session, handle, ctx)
    fresh = _ctx(toy_session, tmp_path)  # a later run: no record of where the ops came from
    cls = toy_session.passes.get("trt-plugin-domain")
    cls(cls.make_options({"inverse": True})).run(handle, fresh)
    nodes, _ = _domains(handle.proto)
    assert nodes["head/rowmean"] == "toy.ops" and nodes["block0/toyscale"] == ""


def test_unknown_custom_ops_move_unless_excluded(toy_session, tmp_path):
    model = toymodels.plugin_model()
    model.graph.node[3].op_type = "VendorThingTRT"
    handle, ctx = ModelHandle(model), _ctx(toy_session, tmp_path)
    _run(toy_session, handle, ctx, include_unknown=False)
    assert _domains(handle.proto)[0]["block0/toyscale"] == ""
    handle2, ctx2 = ModelHandle(model), _ctx(toy_session, tmp_path)
    _run(toy_session, handle2, ctx2)
    assert _domains(handle2.proto)[0]["block0/toyscale"] == "trt.plugins"


def test_unknown_op_type_filter_is_an_error(toy_session, tmp_path):
    with pytest.raises(UserError, match="NotThereTRT not found"):
        _run(toy_session, ModelHandle(toymodels.plugin_model()), _ctx(toy_session, tmp_path), op_types=["NotThereTRT"])


def test_plugin_namespace_attribute_checks_and_runs(toy_session, tmp_path):
    import numpy as np
    import onnx
    from onnx import helper

    handle, ctx = ModelHandle(toymodels.plugin_model()), _ctx(toy_session, tmp_path)
    reference = toy_session.custom_ops.session(handle.proto)
    result = _run(toy_session, handle, ctx, op_types=["ToyScaleTRT"], plugin_namespace="qdqkit")
    assert result.modified
    ns = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("plugin_namespace")
          for n in handle.proto.graph.node}
    assert ns["block0/toyscale"] == b"qdqkit" and ns["head/rowmean"] is None
    toy_session.custom_ops.register_onnx_schemas()
    onnx.checker.check_model(handle.proto, full_check=True)  # the schemas know TensorRT's lookup attributes
    feeds = {i.name: np.random.default_rng(0).standard_normal(
        [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in handle.proto.graph.input}
    got = toy_session.custom_ops.session(handle.proto).run(None, feeds)
    for a, b in zip(got, reference.run(None, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
