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
