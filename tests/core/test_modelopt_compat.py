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
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "shape"], ["t"], name="flatten"),
        # a constant sub-graph: what folding removes (the custom ops' function kernels are full of these)
        helper.make_node("Mul", ["m", "two"], ["m2"], name="const_mul"),
        helper.make_node("MatMul", ["t", "m2"], ["y"], name="mm"),
    ]
    inits = [init("w1", 32, 8, 3, 3), init("w2", 64, 32, 3, 3), init("m", 256, 32),
             numpy_helper.from_array(np.array([1, 64, 256], dtype="int64"), "shape"),
             numpy_helper.from_array(np.array(2.0, dtype="float32"), "two")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def _quantize_recording_levels(tmp_path, fold: bool):
    import numpy as np
    import onnxruntime as ort
    from modelopt.onnx.quantization import quantize
    from onnx import numpy_helper

    levels = []
    original = ort.InferenceSession.__init__

    def spy(self, path_or_bytes, sess_options=None, *a, **k):
        levels.append(None if sess_options is None else sess_options.graph_optimization_level)
        original(self, path_or_bytes, sess_options, *a, **k)

    ort.InferenceSession.__init__ = spy  # innermost: sees the options as onnxruntime will get them
    try:
        with modelopt_compat.patched_modelopt(fold_constants=fold), \
                modelopt_compat.run_in_private_dir(tmp_path) as d:
            onnx.save(_conv_mlp_model(), d / "m.onnx")
            data = np.random.default_rng(0).standard_normal((8, 8, 16, 16)).astype("float32")
            quantize(onnx_path=str(d / "m.onnx"), quantize_mode="int8", calibration_data={"x": data},
                     calibration_method="max", calibration_eps=["cpu"], high_precision_dtype="fp32",
                     dq_only=False, output_path=str(d / "q.onnx"), log_level="ERROR")
            q = onnx.load(str(d / "q.onnx"))
    finally:
        ort.InferenceSession.__init__ = original
    scales = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if "scale" in i.name}
    return levels, scales


def test_calibration_sessions_run_unoptimized_upstream_and_folded_when_patched(tmp_path):
    import numpy as np
    import onnxruntime as ort

    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    levels_up, scales_up = _quantize_recording_levels(tmp_path, fold=False)
    assert off in levels_up  # ModelOpt still switches every optimization off: patch 4 still has work to do
    levels, scales = _quantize_recording_levels(tmp_path, fold=True)
    assert off not in levels and ort.GraphOptimizationLevel.ORT_ENABLE_BASIC in levels
    # the observed ranges, hence every scale ModelOpt writes, are the same with constant folding
    assert scales.keys() == scales_up.keys() and len(scales) >= 4
    for name in scales:
        np.testing.assert_allclose(scales[name], scales_up[name], rtol=1e-6, err_msg=name)
