"""infer-shapes: every tensor typed and shaped through custom ops; errors and fallbacks for ops without a spec."""

from __future__ import annotations

import onnx
import pytest
import toymodels

from qdqkit.errors import UserError
from qdqkit.model import ModelHandle
from qdqkit.pass_infra import PassContext


def _run(session, model, tmp_path, **options):
    handle = ModelHandle(model)
    ctx = PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=tmp_path)
    result = None
    for name, opts in (("detect-custom-ops", {}), ("infer-shapes", options)):
        cls = session.passes.get(name)
        result = cls(cls.make_options(opts)).run(handle, ctx)
    return handle.proto, result


def _shapes(proto):
    out = {}
    for v in (*proto.graph.value_info, *proto.graph.output):
        tt = v.type.tensor_type
        out[v.name] = (tt.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim])
    return out


def test_every_tensor_typed_and_shaped_through_custom_ops(toy_session, tmp_path):
    proto, result = _run(toy_session, toymodels.plugin_model(), tmp_path)
    shapes = _shapes(proto)
    produced = [o for n in proto.graph.node for o in n.output]
    assert set(produced) <= set(shapes)
    assert shapes["s1"] == (onnx.TensorProto.FLOAT, [1, 8, 16])  # ToyScaleTRT, domain ""
    assert shapes["grid"] == (onnx.TensorProto.FLOAT, [1, 8, 4, 4])  # data propagation through Shape/Slice/Concat
    assert shapes["rowmean"] == (onnx.TensorProto.FLOAT, [1, 8, 4])  # ToyRowMeanTRT, domain toy.ops
    assert result.modified and result.stats["untyped"] == 0 and result.stats["unshaped"] == 0
    _, again = _run(toy_session, proto, tmp_path)
    assert again.modified is False


def test_without_data_propagation_the_reshape_is_unresolved(toy_session, tmp_path):
    proto, _ = _run(toy_session, toymodels.plugin_model(), tmp_path, data_prop=False)
    dims = _shapes(proto)["grid"][1]
    assert dims != [1, 8, 4, 4]


def _mystery():
    model = toymodels.plugin_model()
    model.graph.node[3].op_type = "MysteryPluginTRT"  # block0's ToyScaleTRT, now without a spec
    return model


def test_custom_op_without_spec_is_a_clear_error(toy_session, tmp_path):
    with pytest.raises(UserError, match=r"MysteryPluginTRT: no CustomOpSpec is registered; add one through the "
                                        r"qdqkit_register_custom_ops hook"):
        _run(toy_session, _mystery(), tmp_path)


def test_guess_fallback_is_flagged(toy_session, tmp_path):
    proto, result = _run(toy_session, _mystery(), tmp_path, fallback="guess")
    assert result.stats["guessed"] == [{"tensor": "s0", "op": "MysteryPluginTRT"}]
    assert _shapes(proto)["s0"] == (onnx.TensorProto.FLOAT, [1, 8, 16])
    assert result.stats["untyped"] == 0


def test_run_fallback_measures_shapes_in_onnxruntime(toy_session, tmp_path):
    model = toymodels.plugin_model()
    # an op onnx shape inference does not know but onnxruntime can run: a contrib op without a schema here
    node = model.graph.node[2]  # block0/relu
    node.op_type, node.domain = "FastGelu", "com.microsoft"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _, plain = _run(toy_session, model, tmp_path)
    assert plain.stats["untyped"] >= 1 and "r0" in plain.stats["untyped_names"]  # counted, not hidden
    proto, result = _run(toy_session, model, tmp_path, fallback="run")
    assert result.stats["measured"] == 1
    assert _shapes(proto)["r0"] == (onnx.TensorProto.FLOAT, [1, 8, 16])
    assert _shapes(proto)["rowmean"] == (onnx.TensorProto.FLOAT, [1, 8, 4])


def test_run_fallback_says_what_is_missing(toy_session, tmp_path):
    with pytest.raises(UserError, match="could not execute custom op\\(s\\) MysteryPluginTRT"):
        _run(toy_session, _mystery(), tmp_path, fallback="run")


def test_large_model_path_keeps_weights_in_place(toy_session, tmp_path, monkeypatch):
    import qdqkit.model as qm

    monkeypatch.setattr(qm, "LIGHT_WEIGHTS", 1000)  # take the data-less route models past 2 GB take
    skeletons = []
    real = qm.structure_only
    monkeypatch.setattr(qm, "structure_only", lambda proto, *a: skeletons.append(real(proto, *a)) or skeletons[-1])
    model = toymodels.big_model(total_bytes=2 * 512 * 512 * 4, width=512)
    weights = [t.raw_data for t in model.graph.initializer]
    proto, result = _run(toy_session, model, tmp_path)
    assert [t.raw_data for t in proto.graph.initializer] == weights
    assert skeletons and all(t.data_location == onnx.TensorProto.EXTERNAL for t in skeletons[0].graph.initializer)
    assert _shapes(proto)["h1"] == (onnx.TensorProto.FLOAT, [1, 512])
    assert result.stats["untyped"] == 0
