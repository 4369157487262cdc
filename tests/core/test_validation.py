"""`compare` and the evaluation copy: thresholds, held-out samples, and the fp16 QuantizeLinear correction."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdqkit.calib import ArraySource
from qdqkit.errors import UserError
from qdqkit.validation import compare, evaluation_copy


def _linear(seed: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((6, 4)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _source(n: int) -> ArraySource:
    x = np.random.default_rng(3).standard_normal((n, 6)).astype(np.float32)
    return ArraySource({"x": x}, {"x": (np.dtype(np.float32), (1, 6))}, "mem")


def test_identical_models_pass_and_different_ones_fail():
    r = compare(_linear(0), _linear(0), _source(10), None, start=4, count=6)
    assert r.passed and r.outputs[0].cosine_min == pytest.approx(1.0) and r.outputs[0].max_abs == 0
    assert r.samples == (4, 6) and "held out" in r.table()
    bad = compare(_linear(0), _linear(1), _source(10), None, start=4, count=6)
    assert not bad.passed and bad.outputs[0].cosine_min < 0.9 and "NO" in bad.table()
    snr = compare(_linear(0), _linear(0), _source(10), None, 0, 2, min_cosine=0.5, min_snr_db=1e9)
    assert snr.passed  # zero error: infinite SNR


def test_too_few_held_out_samples():
    with pytest.raises(UserError, match="validation needs 6 samples after the first 8"):
        compare(_linear(0), _linear(0), _source(10), None, start=8, count=6)


def _fp16_qdq() -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="to16"),
             helper.make_node("QuantizeLinear", ["h", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
             helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT, name="to32")]
    inits = [numpy_helper.from_array(np.array(1.0, np.float16), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def test_fp16_quantize_linear_rounds_in_the_evaluation_copy():
    m = _fp16_qdq()
    copy, notes = evaluation_copy(m)
    assert len(notes) == 1 and "truncates" in notes[0]
    x = np.array([0.75, -0.75, 2.6, 1.25], np.float32)
    s = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], [1.0, -1.0, 3.0, 1.0])  # round half to even
    assert len(m.graph.node) == 4  # the model itself is untouched
