"""simplify: onnxsim with custom ops kept, checked, and numerically compared; clean skips."""

from __future__ import annotations

import numpy as np
import onnx
import toymodels
from onnx import helper

from qdqkit.model import ModelHandle
from qdqkit.pass_infra import PassContext


def _run(session, model, tmp_path, **options):
    handle = ModelHandle(model)
    ctx = PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=tmp_path)
    cls = session.passes.get("simplify")
    return handle, cls(cls.make_options(options)).run(handle, ctx)


def _foldable_model():
    """The toy model plus a constant subgraph (Shape of a constant -> Cast -> Mul) that onnxsim folds."""
    model = toymodels.plugin_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.full((1, 8, 16), 2.0, np.float32), "two"))
    model.graph.node.extend([
        helper.make_node("Identity", ["two"], ["two_id"], name="fold/id"),
        helper.make_node("Mul", ["two_id", "two_id"], ["four"], name="fold/mul"),
    ])
    # feed the folded value into the graph: y = Gemm(...) stays, but the first block input is scaled
    for n in model.graph.node:
        if n.name == "block0/matmul":
            n.input[0] = "xs"
    model.graph.node.insert(0, helper.make_node("Mul", ["x", "four"], ["xs"], name="scale_in"))
    # keep topological order: the constant subgraph first
    nodes = list(model.graph.node)
    fold = [n for n in nodes if n.name.startswith("fold/")]
    rest = [n for n in nodes if not n.name.startswith("fold/")]
    del model.graph.node[:]
    model.graph.node.extend(fold + rest)
    return model


def test_folds_constants_and_keeps_custom_ops(toy_session, tmp_path):
    model = _foldable_model()
    handle, result = _run(toy_session, model, tmp_path)
    assert result.modified and "skipped" not in result.stats
    ops = [(n.domain, n.op_type) for n in handle.proto.graph.node]
    assert ("", "Identity") not in ops and result.stats["nodes_after"] < result.stats["nodes_before"]
    assert ops.count(("", "ToyScaleTRT")) == 2 and ops.count(("toy.ops", "ToyRowMeanTRT")) == 1
    x = np.random.default_rng(0).standard_normal((1, 8, 16)).astype(np.float32)
    a = toy_session.custom_ops.session(model).run(None, {"x": x})[0]
    b = toy_session.custom_ops.session(handle.proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_large_model_is_skipped_with_a_reason(toy_session, tmp_path, monkeypatch):
    import qdqkit.model as qm

    monkeypatch.setattr(qm, "PROTOBUF_LIMIT", 1000)  # a small model stands in for one past 2 GB
    handle, result = _run(toy_session, toymodels.plugin_model(), tmp_path)
    assert result.modified is False and "over 2 GB" in result.stats["skipped"]


def test_unknown_custom_op_is_skipped_not_broken(toy_session, tmp_path):
    model = toymodels.plugin_model()
    model.graph.node[3].op_type = "MysteryPluginTRT"
    before = model.SerializeToString()
    handle, result = _run(toy_session, model, tmp_path)
    assert result.modified is False and result.stats["skipped"]
    assert handle.proto.SerializeToString() == before


def test_numeric_disagreement_keeps_the_input_model(toy_session, tmp_path):
    model = _foldable_model()
    before = model.SerializeToString()
    # a tolerance no result can meet: the comparison must then refuse onnxsim's model, not fail the run
    handle, result = _run(toy_session, model, tmp_path, atol=-1.0, rtol=0.0)
    assert result.modified is False and "differs from the input model on output 'y'" in result.stats["skipped"]
    assert handle.proto.SerializeToString() == before
