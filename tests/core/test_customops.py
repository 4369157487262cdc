"""The custom-op registry: keys, schemas, execution copies, sessions, and the onnxruntime install hook."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import qdqkit_toyops as toy
import toymodels

from qdqkit.customops import TRT_PLUGIN_DOMAIN, CustomOpRegistry, CustomOpSpec, IOSpec, classify_nodes
from qdqkit.errors import PassContractError, UserError


@pytest.fixture
def registry():
    reg = CustomOpRegistry()
    reg.current_plugin = "toy"
    for spec in toy.SPECS:
        reg.add(spec)
    reg.register_onnx_schemas()
    return reg


def _reference_forward(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The toy plugin model computed with numpy only (the specs' references), as an independent oracle."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    h = x
    blocks = sum(1 for n in model.graph.node if n.op_type == "ToyScaleTRT")
    for b in range(blocks):
        node = next(n for n in model.graph.node if n.name == f"block{b}/toyscale")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        r = np.maximum(h @ inits[f"w{b}"] + inits[f"b{b}"], 0)
        h = toy.TOY_SCALE.run_reference(r, **attrs)[0] + h
    grid = h.reshape(1, 8, 4, 4)
    flat = toy.TOY_ROWMEAN.run_reference(grid)[0].reshape(1, 32)
    return flat @ inits["wout"] + inits["bout"]


def test_lookup_resolves_default_aliases_and_trt_domain(registry):
    assert registry.lookup("", "ToyScaleTRT") is toy.TOY_SCALE
    assert registry.lookup("ai.onnx", "ToyScaleTRT") is toy.TOY_SCALE
    assert registry.lookup(TRT_PLUGIN_DOMAIN, "ToyScaleTRT") is toy.TOY_SCALE
    assert registry.lookup("toy.ops", "ToyRowMeanTRT") is toy.TOY_ROWMEAN
    assert registry.lookup("toy.legacy", "ToyRowMean") is toy.TOY_ROWMEAN
    assert registry.lookup("toy.ops", "ToyScaleTRT") is None
    assert registry.lookup("", "Relu") is None
    assert len(registry) == 3 and [id(s) for s in registry] == [id(s) for s in toy.SPECS]


def test_conflicting_key_names_both_plugins(registry):
    clash = CustomOpSpec("ToyScaleTRT", (IOSpec("x", toy.FLOAT),), (IOSpec("y", toy.FLOAT),), toy._same,
                         domain="elsewhere")
    registry.current_plugin = "intruder"
    with pytest.raises(PassContractError, match=r"registered twice.*'toy'.*'intruder'"):
        registry.add(clash)


def test_schemas_make_checker_and_shape_inference_accept_custom_ops(registry):
    model = toymodels.plugin_model()
    registry.register_onnx_schemas()  # idempotent
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    assert shapes["s0"] == [1, 8, 16]
    assert shapes["grid"] == [1, 8, 4, 4]  # needs data propagation through Shape/Slice/Concat
    assert shapes["rowmean"] == [1, 8, 4]  # the spec's own shape function


def test_execution_model_adds_functions_and_leaves_input_alone(registry):
    model = toymodels.plugin_model()
    before = model.SerializeToString()
    exe = registry.execution_model(model)
    assert model.SerializeToString() == before
    assert {(f.domain, f.name) for f in exe.functions} == {(TRT_PLUGIN_DOMAIN, "ToyScaleTRT"),
                                                            ("toy.ops", "ToyRowMeanTRT")}
    # onnxruntime ignores default-domain model-local functions: those nodes move to trt.plugins in the copy
    assert {n.domain for n in exe.graph.node if n.op_type == "ToyScaleTRT"} == {TRT_PLUGIN_DOMAIN}
    assert TRT_PLUGIN_DOMAIN in {o.domain for o in exe.opset_import}
    stripped = registry.strip_functions(exe)
    assert len(stripped.functions) == 0


def test_session_matches_numpy_reference(registry):
    model = toymodels.plugin_model(seed=3)
    x = np.random.default_rng(1).standard_normal((1, 8, 16)).astype(np.float32)
    got = registry.session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _reference_forward(model, x), rtol=1e-5, atol=1e-5)


def test_plain_session_fails_without_registry(registry):
    with pytest.raises(Exception, match="ToyScaleTRT|No Op registered"):
        ort.InferenceSession(toymodels.plugin_model().SerializeToString(), providers=["CPUExecutionProvider"])


def test_installed_in_onnxruntime_serves_paths_bytes_and_upgraded_opsets(registry, tmp_path):
    model = toymodels.plugin_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    upgraded = onnx.version_converter.convert_version(model, 19)  # what ModelOpt does before calibrating
    x = np.ones((1, 8, 16), np.float32)
    original_init = ort.InferenceSession.__init__
    cpu = ["CPUExecutionProvider"]
    with registry.installed_in_onnxruntime():
        a = ort.InferenceSession(str(path), providers=cpu).run(None, {"x": x})[0]
        b = ort.InferenceSession(model.SerializeToString(), providers=cpu).run(None, {"x": x})[0]
        c = ort.InferenceSession(upgraded.SerializeToString(), providers=cpu).run(None, {"x": x})[0]
    assert ort.InferenceSession.__init__ is original_init
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5)
    assert list(tmp_path.iterdir()) == [path]  # nothing left beside the model


def test_install_hook_is_removed_on_exception(registry):
    original_init = ort.InferenceSession.__init__
    with pytest.raises(RuntimeError, match="boom"), registry.installed_in_onnxruntime():
        assert ort.InferenceSession.__init__ is not original_init
        raise RuntimeError("boom")
    assert ort.InferenceSession.__init__ is original_init


def test_python_kernel_only_op_runs(registry):
    model = toymodels.plugin_model(gate=True)
    x = np.random.default_rng(2).standard_normal((1, 8, 16)).astype(np.float32)
    got = registry.session(model).run(None, {"x": x})[0]
    gate = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gate"))
    # same model without the gate, fed the gated activations by hand, is the oracle
    plain = toymodels.plugin_model(gate=False)
    assert got.shape == (1, 5)
    h = registry.session(_cut_after_blocks(plain)).run(None, {"x": x})[0]
    assert np.isfinite(got).all() and gate.shape == h.shape
    expect = _head(plain, toy.TOY_GATE.run_reference(h, gate)[0])
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def _cut_after_blocks(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.ClearField("output")
    out.graph.output.append(onnx.helper.make_tensor_value_info("h1", onnx.TensorProto.FLOAT, [1, 8, 16]))
    return out


def _head(model: onnx.ModelProto, h: np.ndarray) -> np.ndarray:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    flat = toy.TOY_ROWMEAN.run_reference(h.reshape(1, 8, 4, 4))[0].reshape(1, 32)
    return flat @ inits["wout"] + inits["bout"]


def test_op_without_cpu_implementation_is_a_clear_error():
    reg = CustomOpRegistry()
    reg.add(CustomOpSpec("ToyNoKernelTRT", (IOSpec("x", toy.FLOAT),), (IOSpec("y", toy.FLOAT),), toy._same,
                         domain="toy.nokernel"))
    model = toymodels.plugin_model()
    model.graph.node[3].op_type, model.graph.node[3].domain = "ToyNoKernelTRT", "toy.nokernel"
    with pytest.raises(UserError, match="ToyNoKernelTRT have no CPU implementation"):
        reg.execution_model(model)


def test_classify_nodes(registry):
    model = toymodels.plugin_model()
    model.graph.node[1].domain = "com.microsoft"  # pretend contrib
    model.graph.node[2].op_type = "MysteryTRT"  # default-domain op nobody describes
    census = classify_nodes(model, registry)
    assert census["nodes"]["block0/toyscale"]["class"] == "known-custom"
    assert census["nodes"]["head/rowmean"]["spec"] == "toy.ops::ToyRowMeanTRT"
    assert census["nodes"]["block0/bias"]["class"] == "contrib"
    assert census["nodes"]["block0/relu"]["class"] == "unknown-custom"
    assert census["unknown"] == ["MysteryTRT"]
    assert census["counts"]["known-custom"] == 3


def test_installed_hook_opens_models_with_external_data(registry, tmp_path):
    from qdqkit.model import save_model

    model = toymodels.big_model(total_bytes=2 * 64 * 64 * 4, width=64)
    path = tmp_path / "ext.onnx"
    save_model(model, path, external_data=True)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    with registry.installed_in_onnxruntime():
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    h = x.astype(np.float64)
    for t in model.graph.initializer:
        h = h @ onnx.numpy_helper.to_array(t).astype(np.float64)
    np.testing.assert_allclose(got, h.mean(axis=-1), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
