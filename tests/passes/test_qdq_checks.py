"""The qdq pass's own checks of a back end's result, on hand-built Q/DQ graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdqkit.quant_backends import plugin_precision_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from passes.qdq import check_downstream_of_custom_ops, check_plugin_precision  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qdq_models  # noqa: E402


@pytest.fixture(scope="module")
def registry():
    from qdqkit.plugins import Session

    s = Session.start()
    s.custom_ops.register_onnx_schemas()
    return s.custom_ops


def _after_plugin(activation_quantized: bool):
    """RotateTRT2 -> MatMul whose weight has Q/DQ; its activation has Q/DQ only if asked."""
    inits = [numpy_helper.from_array(np.ones((8, 8), np.float32), "w"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.array(10.0, np.float32), "angle"),
             numpy_helper.from_array(np.array([4.0, 4.0], np.float32), "center")]
    nodes = [helper.make_node("RotateTRT2", ["x", "angle", "center"], ["r"], name="rot", interpolation=1),
             helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="qw"),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="dqw")]
    a = "r"
    if activation_quantized:
        nodes += [helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], name="qr"),
                  helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd"], name="dqr")]
        a = "rd"
    nodes.append(helper.make_node("MatMul", [a, "wd"], ["y"], name="mm"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def test_weight_only_quantization_after_a_plugin_is_caught(registry):
    bad = check_downstream_of_custom_ops(_after_plugin(False), registry, set())
    assert bad["weight_only"] == ["mm"]
    good = check_downstream_of_custom_ops(_after_plugin(True), registry, set())
    assert good["int8"] == ["mm"] and good["weight_only"] == []


def test_plugin_precision_plan_and_mismatch(registry):
    model = qdq_models.transformer_msda()
    flags, plan = plugin_precision_plan(model, registry, "fp16", {qdq_models.MSDA: "value=int8,*=fp16"})
    assert flags == [f"{qdq_models.MSDA}:[int8,int64,fp16,fp16,fp16]:[fp16]"]
    # the float model feeds fp32 everywhere: a plan asking for fp16 must be reported as not applied
    with pytest.raises(RuntimeError, match="planned fp16, got fp32"):
        check_plugin_precision(model, registry, {qdq_models.MSDA: {"reference_points": "fp16"}})
    _, plan32 = plugin_precision_plan(model, registry, "fp32", None)
    assert set(plan32[qdq_models.MSDA].values()) == {"fp32", "int64"}
