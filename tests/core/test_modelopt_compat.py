"""One test per ModelOpt behaviour qdqkit patches or works around (qdqkit/modelopt_compat.py).

Each "still broken upstream" test documents the defect in the installed ModelOpt: when a release fixes it, that
test fails, telling us the patch can go.
"""

from __future__ import annotations

import os

import onnx
import pytest
from onnx import TensorProto, helper

from qdqkit import modelopt_compat

pytest.importorskip("modelopt.onnx.quantization")


def _two_plugin_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("OpA", ["x"], ["a"], name="a", domain="trt.plugins"),
             helper.make_node("OpB", ["a"], ["y"], name="b", domain="trt.plugins")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt.plugins", 1)])


def test_version_is_the_tested_one():
    assert modelopt_compat.check_version().startswith(modelopt_compat.TESTED_VERSION + ".")


def test_precision_flags_of_several_plugins_still_overwrite_upstream():
    from modelopt.onnx.trt_utils import interpret_trt_plugins_precision_flag

    cast, _ = interpret_trt_plugins_precision_flag(_two_plugin_model(), ["OpA:fp32", "OpB:fp32"])
    assert list(cast["fp32"]) == ["OpB"]  # OpA lost: the defect the patch works around


def test_patched_precision_flags_keep_every_plugin():
    import importlib

    # the package re-exports a function named `quantize`, which hides the submodule of that name
    q_mod = importlib.import_module("modelopt.onnx.quantization.quantize")
    gs_mod = importlib.import_module("modelopt.onnx.autocast.graphsanitizer")

    flags = ["OpA:fp32", "OpB:fp32", "OpA:[fp16]:[fp16]"]
    with modelopt_compat.patched_modelopt():
        for mod in (q_mod, gs_mod):
            cast, quant = mod.interpret_trt_plugins_precision_flag(_two_plugin_model(), flags[:2])
            assert sorted(cast["fp32"]) == ["OpA", "OpB"] and quant == {}
        cast, _ = q_mod.interpret_trt_plugins_precision_flag(
            _two_plugin_model(), ["OpA:[int8]:[fp32]", "OpB:[fp16]:[fp16]"])
        assert list(cast["fp16"]) == ["OpB"]
    # restored afterwards
    assert not hasattr(q_mod.interpret_trt_plugins_precision_flag, "qdqkit_original")


@pytest.mark.skipif(modelopt_compat.tensorrt_available(), reason="the defect only shows without TensorRT")
def test_autocast_custom_node_discovery_still_needs_tensorrt_upstream():
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer

    with pytest.raises(NameError, match="trt"):
        GraphSanitizer(_two_plugin_model()).find_custom_nodes()


@pytest.mark.skipif(modelopt_compat.tensorrt_available(), reason="the patch is only installed without TensorRT")
def test_patched_custom_node_discovery_works_without_tensorrt():
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer

    m = _two_plugin_model()
    for n in m.graph.node:
        n.domain = ""
    with modelopt_compat.patched_modelopt():
        s = GraphSanitizer(m)
        s.find_custom_nodes()
    assert s.custom_ops == {"OpA", "OpB"}
    assert all(n.domain == "trt.plugins" for n in s.model.graph.node)
    assert any(o.domain == "trt.plugins" for o in s.model.opset_import)


def test_private_dir_is_the_cwd_and_disappears(tmp_path):
    before = os.getcwd()
    with modelopt_compat.run_in_private_dir(tmp_path) as d:
        assert os.getcwd() == str(d)
        (d / "sym_shape_infer_temp.onnx").write_bytes(b"junk")
    assert os.getcwd() == before and not d.exists() and list(tmp_path.iterdir()) == []


def test_onnxruntime_quantization_is_restored_after_modelopt():
    from modelopt.onnx.quantization.ort_patching import patch_ort_modules
    from onnxruntime.quantization.calibrate import CalibraterBase, MinMaxCalibrater

    before = (CalibraterBase.__init__, MinMaxCalibrater.collect_data)
    with modelopt_compat.patched_modelopt():
        patch_ort_modules()  # what every ModelOpt quantize() call does, for good
        assert MinMaxCalibrater.collect_data is not before[1]
    assert (CalibraterBase.__init__, MinMaxCalibrater.collect_data) == before


def _conv_mlp_model() -> onnx.ModelProto:
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(3)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype("float32") * 0.2, name)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 32])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w1b"], ["c1b"], name="conv1b", pads=[1, 1, 1, 1]),
        # a quantized tensor into a quantized Concat: ModelOpt gives both one range (its group_qdq_tensors)
        helper.make_node("Concat", ["r1", "c1b"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "shape"], ["t"], name="flatten"),
        # a constant sub-graph: what folding removes (the custom ops' function kernels are full of these)
        helper.make_node("Mul", ["m", "two"], ["m2"], name="const_mul"),
        helper.make_node("MatMul", ["t", "m2"], ["y"], name="mm"),
    ]
    inits = [init("w1", 16, 8, 3, 3), init("w1b", 16, 16, 3, 3), init("w2", 64, 32, 3, 3), init("m", 256, 32),
             numpy_helper.from_array(np.array([1, 64, 256], dtype="int64"), "shape"),
             numpy_helper.from_array(np.array(2.0, dtype="float32"), "two")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


_SAMPLES = 8


def _quantize_recording(tmp_path, fold: bool, running: bool, external: bool = False) -> dict:
    """Quantize the test model ("max" calibration) with the given patches; record what the calibration did."""
    import numpy as np
    import onnxruntime as ort
    from modelopt.onnx.quantization import ort_patching, quantize
    from onnx import numpy_helper

    rec: dict = {"levels": [], "arena": [], "fetched": [], "compute_data": 0, "groups": None}
    original_init, original_run = ort.InferenceSession.__init__, ort.InferenceSession.run
    original_compute = ort_patching._compute_data_minmax_calibrator

    def spy_init(self, path_or_bytes, sess_options=None, *a, **k):
        rec["levels"].append(None if sess_options is None else sess_options.graph_optimization_level)
        rec["arena"].append(None if sess_options is None else sess_options.enable_cpu_mem_arena)
        original_init(self, path_or_bytes, sess_options, *a, **k)

    def spy_run(self, output_names, *a, **k):
        if any(o.name.endswith("_ReduceMax") or o.name.startswith("qdqkit_minmax_") for o in self.get_outputs()):
            rec["fetched"].append(None if output_names is None else list(output_names))
        return original_run(self, output_names, *a, **k)

    def spy_compute(calibrator):
        rec["compute_data"] += 1
        rec["groups"] = calibrator.group_qdq_tensors
        return original_compute(calibrator)

    # innermost: sees the options as onnxruntime will get them; ModelOpt installs the compute_data it finds here
    ort.InferenceSession.__init__, ort.InferenceSession.run = spy_init, spy_run
    ort_patching._compute_data_minmax_calibrator = spy_compute
    try:
        with modelopt_compat.patched_modelopt(fold_constants=fold, running_ranges=running), \
                modelopt_compat.run_in_private_dir(tmp_path) as d:
            onnx.save(_conv_mlp_model(), d / "m.onnx")
            data = np.random.default_rng(0).standard_normal((_SAMPLES, 8, 16, 16)).astype("float32")
            data *= np.linspace(0.5, 2.0, _SAMPLES, dtype="float32")[:, None, None, None]  # every sample counts
            quantize(onnx_path=str(d / "m.onnx"), quantize_mode="int8", calibration_data={"x": data},
                     calibration_method="max", calibration_eps=["cpu"], high_precision_dtype="fp32",
                     dq_only=False, output_path=str(d / "q.onnx"), log_level="ERROR",
                     use_external_data_format=external)
            q = onnx.load(str(d / "q.onnx"))
    finally:
        ort.InferenceSession.__init__, ort.InferenceSession.run = original_init, original_run
        ort_patching._compute_data_minmax_calibrator = original_compute
    rec["scales"] = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if "scale" in i.name}
    return rec


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """ModelOpt's own calibration path, every calibration patch off."""
    return _quantize_recording(tmp_path_factory.mktemp("upstream"), fold=False, running=False)


def _assert_same_scales(got: dict, want: dict) -> None:
    import numpy as np

    assert got.keys() == want.keys() and len(got) >= 4
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_calibration_sessions_run_unoptimized_upstream_and_folded_when_patched(tmp_path, upstream):
    import onnxruntime as ort

    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # ModelOpt still switches every optimization and the arena off: patch 4 still has work to do
    assert off in upstream["levels"] and False in upstream["arena"]
    rec = _quantize_recording(tmp_path, fold=True, running=False)
    assert off not in rec["levels"] and ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED in rec["levels"]
    assert False not in rec["arena"]
    # the observed ranges, hence every scale ModelOpt writes, are the same with constant folding
    _assert_same_scales(rec["scales"], upstream["scales"])


def test_max_calibration_merges_ranges_per_sample_upstream_and_keeps_running_ones_when_patched(tmp_path, upstream):
    # ModelOpt fetches every output and merges the ranges in Python after each sample: patch 5 has work to do
    assert upstream["compute_data"] == _SAMPLES + 1 and upstream["fetched"] == [None] * _SAMPLES
    assert upstream["groups"]  # the Concat's inputs share one range: that merge is exercised too
    rec = _quantize_recording(tmp_path, fold=False, running=True)
    # one merge over the running minima and maxima (plus ModelOpt's final call); only the reductions fetched,
    # gathered into one output per rank
    assert rec["compute_data"] == 2 and len(rec["fetched"]) == _SAMPLES
    assert all(f and all(n.startswith("qdqkit_minmax_") for n in f) for f in rec["fetched"])
    assert 1 <= len(rec["fetched"][0]) <= 3  # the observed tensors are of rank 2 to 4, all float
    _assert_same_scales(rec["scales"], upstream["scales"])


def test_calibration_as_shipped_gives_modelopts_scales(tmp_path, upstream):
    rec = _quantize_recording(tmp_path, fold=True, running=True)
    _assert_same_scales(rec["scales"], upstream["scales"])


def test_max_calibration_with_external_data_keeps_one_output_per_reduction(tmp_path, upstream):
    # a model saved with external data cannot be re-saved after augmentation: the running ranges alone
    rec = _quantize_recording(tmp_path, fold=True, running=True, external=True)
    assert rec["compute_data"] == 2 and len(rec["fetched"]) == _SAMPLES
    assert all(f and all(n.endswith(("_ReduceMin", "_ReduceMax")) for n in f) for f in rec["fetched"])
    _assert_same_scales(rec["scales"], upstream["scales"])
