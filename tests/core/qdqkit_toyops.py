"""A test-only qdqkit plugin: three small custom ops whose maths is a couple of standard ops.

* ``ToyScaleTRT`` (default domain, as TensorRT plugin ops are usually exported): ``y = x * scale + shift``.
* ``ToyRowMeanTRT`` (domain ``toy.ops``): mean over the last axis, ``[..., L] -> [...]``.
* ``ToyGateTRT`` (default domain, Python kernel only): ``y = x * sigmoid(g)``, to exercise the
  onnxruntime-extensions path for ops that have no ONNX function.
The core never imports this module; tests load it with ``-p qdqkit_toyops`` or register it directly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qdqkit.customops import AttrSpec, CustomOpSpec, IOSpec, TensorInfo, TrtPlugin
from qdqkit.hookspecs import hookimpl

FLOAT = ("tensor(float)",)


def _attr_constant(out: str, attr: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    ref = node.attribute.add()
    ref.name, ref.ref_attr_name, ref.type = "value_float", attr, onnx.AttributeProto.FLOAT
    return node


def _scale_function(opset: int) -> onnx.FunctionProto:
    nodes = [_attr_constant("s", "scale"), _attr_constant("b", "shift"),
             helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Add", ["xs", "b"], ["y"])]
    return helper.make_function("toy", "ToyScaleTRT", ["x"], ["y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=["scale", "shift"])


def _same(inputs: list[TensorInfo | None], attrs: dict) -> list[TensorInfo]:
    x = inputs[0]
    return [x if x is not None else TensorInfo(onnx.TensorProto.FLOAT, None)]


def _rowmean_function(opset: int) -> onnx.FunctionProto:
    if opset >= 18:
        nodes = [helper.make_node("Constant", [], ["axes"], value_ints=[-1]),
                 helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)]
    else:
        nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=[-1], keepdims=0)]
    return helper.make_function("toy", "ToyRowMeanTRT", ["x"], ["y"], nodes, [helper.make_opsetid("", opset)])


def _rowmean_infer(inputs: list[TensorInfo | None], attrs: dict) -> list[TensorInfo]:
    x = inputs[0]
    if x is None or x.shape is None:
        return [TensorInfo(onnx.TensorProto.FLOAT, None)]
    if not x.shape:
        raise ValueError("ToyRowMeanTRT needs an input of rank >= 1")
    return [TensorInfo(x.elem_type, tuple(x.shape[:-1]))]


def _gate_kernel(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    return (x * (1.0 / (1.0 + np.exp(-g)))).astype(np.float32)


TOY_SCALE = CustomOpSpec(
    op_type="ToyScaleTRT",
    inputs=(IOSpec("x", FLOAT),),
    outputs=(IOSpec("y", FLOAT),),
    infer=_same,
    attributes=(AttrSpec("scale", "float", 1.0), AttrSpec("shift", "float", 0.0)),
    reference=lambda x, scale, shift: (x.astype(np.float64) * scale + shift).astype(np.float32),
    function=_scale_function,
    trt=TrtPlugin("ToyScaleTRT", formats={"x": ("fp32", "fp16"), "y": ("fp32", "fp16")}),
    doc="y = x * scale + shift",
)

TOY_ROWMEAN = CustomOpSpec(
    op_type="ToyRowMeanTRT",
    domain="toy.ops",
    aliases=(("toy.legacy", "ToyRowMean"),),
    inputs=(IOSpec("x", FLOAT),),
    outputs=(IOSpec("y", FLOAT),),
    infer=_rowmean_infer,
    reference=lambda x: x.astype(np.float64).mean(axis=-1).astype(np.float32),
    function=_rowmean_function,
    trt=TrtPlugin("ToyRowMeanTRT"),
    doc="mean over the last axis",
)

TOY_GATE = CustomOpSpec(
    op_type="ToyGateTRT",
    inputs=(IOSpec("x", FLOAT), IOSpec("g", FLOAT)),
    outputs=(IOSpec("y", FLOAT),),
    infer=_same,
    reference=_gate_kernel,
    python_kernel=_gate_kernel,
    doc="y = x * sigmoid(g), Python kernel only",
)

SPECS = (TOY_SCALE, TOY_ROWMEAN, TOY_GATE)


@hookimpl
def qdqkit_register_custom_ops(registry):
    for spec in SPECS:
        registry.add(spec)
