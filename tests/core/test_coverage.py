"""Q/DQ counts and INT8 coverage by FLOPs on hand-built models whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdqkit.coverage import format_summary, qdq_summary


def _model(quantize_first: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = []
    a, w1 = "x", "w1"
    if quantize_first:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="qx"),
                  helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dqx"),
                  helper.make_node("QuantizeLinear", ["w1", "s", "z"], ["w1q"], name="qw"),
                  helper.make_node("DequantizeLinear", ["w1q", "s", "z"], ["w1d"], name="dqw"),
                  helper.make_node("Cast", ["xd"], ["xc"], to=TensorProto.FLOAT, name="cast")]
        a, w1 = "xc", "w1d"
    nodes += [helper.make_node("MatMul", [a, w1], ["h"], name="mm1"),
              helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def test_coverage_counts_flops_of_int8_compute():
    s = qdq_summary(_model(True))
    assert s["quantize_linear"] == 2 and s["dequantize_linear"] == 2
    # mm1: 2*1*8*4 = 64 FLOPs in INT8 (through a Cast); mm2: 2*1*8*8 = 128 in float
    assert s["int8_coverage"] == 64 / 192
    mm = s["compute"]["MatMul"]
    assert (mm["nodes"], mm["int8"]) == (2, 1)
    assert mm["gflops"] == pytest.approx(192e-9) and mm["int8_gflops"] == pytest.approx(64e-9)
    assert s["dq_inputs_by_op_type"] == {"MatMul": {"nodes": 1, "dq_inputs": 2}}
    assert "INT8 coverage: 33.3% of MatMul FLOPs" in format_summary(s)  # names the op types it counted


def test_float_model_has_zero_coverage():
    s = qdq_summary(_model(False))
    assert s["int8_coverage"] == 0 and s["quantize_linear"] == 0


def test_conv_flops():
    w = numpy_helper.from_array(np.zeros((16, 3, 3, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="c")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    s = qdq_summary(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert abs(s["compute"]["Conv"]["gflops"] - 2 * 16 * 64 * 27 / 1e9) < 1e-15


def test_heavy_model_is_summarised_from_its_structure(monkeypatch):
    from qdqkit import model as qmodel

    light = qdq_summary(_model(True))
    monkeypatch.setattr(qmodel, "LIGHT_WEIGHTS", 1)  # treat the toy model as heavy
    seen = []
    real = qmodel.structure_only
    # every weight data-less (threshold 0): the FLOPs must come from dims alone
    monkeypatch.setattr(qmodel, "structure_only", lambda m: seen.append(1) or real(m, 0))
    assert qdq_summary(_model(True)) == light and seen == [1]


@pytest.mark.parametrize("layout", ["3d", "4d"])
def test_attention_op_counts_the_flops_of_its_two_matmuls(layout):
    """The ONNX Attention op (opset 23) counts what the decomposed form's two MatMuls count: Q·Kᵀ and ·V, here
    2 heads, 5 queries, 7 keys, Dk = 3, Dv = 4; its INT8 share when Q and K arrive through DequantizeLinear."""
    B, H, Sq, Skv, Dk, Dv = 1, 2, 5, 7, 3, 4
    want = 2 * B * H * Sq * Skv * Dk + 2 * B * H * Sq * Skv * Dv
    if layout == "3d":
        q, k, v, o = [B, Sq, H * Dk], [B, Skv, H * Dk], [B, Skv, H * Dv], [B, Sq, H * Dv]
        attrs = {"q_num_heads": H, "kv_num_heads": H}
    else:
        q, k, v, o = [B, H, Sq, Dk], [B, H, Skv, Dk], [B, H, Skv, Dv], [B, H, Sq, Dv]
        attrs = {}
    s, z = numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", [t, "s", "z"], [f"{t}q"], name=f"q{t}") for t in ("Q", "K")]
    nodes += [helper.make_node("DequantizeLinear", [f"{t}q", "s", "z"], [f"{t}d"], name=f"dq{t}") for t in ("Q", "K")]
    nodes.append(helper.make_node("Attention", ["Qd", "Kd", "V"], ["Y"], name="attn", **attrs))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, sh)
                                       for n, sh in (("Q", q), ("K", k), ("V", v))],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, o)], [s, z])
    summary = qdq_summary(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]))
    assert summary["compute"]["Attention"]["gflops"] * 1e9 == pytest.approx(want)
    assert summary["int8_coverage"] == 1.0 and summary["unknown_shape_nodes"] == []
    assert "100.0% of Attention FLOPs" in format_summary(summary)
