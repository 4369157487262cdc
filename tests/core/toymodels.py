"""Seeded generators of plugin-laden test models (standard ops plus the toy custom ops of ``qdqkit_toyops``).

Nothing here is downloaded; every model is built from a seed, so a test or benchmark can regenerate it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def plugin_model(seed: int = 0, blocks: int = 2, gate: bool = False, opset: int = OPSET,
                 rowmean_domain: str = "toy.ops") -> onnx.ModelProto:
    """x[1,8,16] -> blocks of MatMul/Add/Relu/ToyScaleTRT("")/residual Add -> Reshape computed from Shape (data
    propagation) -> ToyRowMeanTRT(``rowmean_domain``) -> Flatten -> Gemm -> y[1,5]. No value_info is written.

    With ``gate`` a ToyGateTRT node (Python kernel only) follows the blocks.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = "x"
    for b in range(blocks):
        w = rng.standard_normal((16, 16)).astype(np.float32) * 0.25
        bias = rng.standard_normal(16).astype(np.float32) * 0.1
        inits += [_init(f"w{b}", w), _init(f"b{b}", bias)]
        nodes += [
            helper.make_node("MatMul", [h, f"w{b}"], [f"mm{b}"], name=f"block{b}/matmul"),
            helper.make_node("Add", [f"mm{b}", f"b{b}"], [f"ab{b}"], name=f"block{b}/bias"),
            helper.make_node("Relu", [f"ab{b}"], [f"r{b}"], name=f"block{b}/relu"),
            helper.make_node("ToyScaleTRT", [f"r{b}"], [f"s{b}"], name=f"block{b}/toyscale", domain="",
                             scale=0.5 + 0.25 * b, shift=0.125),
            helper.make_node("Add", [f"s{b}", h], [f"h{b}"], name=f"block{b}/residual"),
        ]
        h = f"h{b}"
    if gate:
        # its own stream, so the rest of the weights are those of the gate-less model
        gate_values = np.random.default_rng(seed + 1000).standard_normal((1, 8, 16)).astype(np.float32)
        inits.append(_init("gate", gate_values))
        nodes.append(helper.make_node("ToyGateTRT", [h, "gate"], ["gated"], name="gate", domain=""))
        h = "gated"
    inits += [_init("starts", np.array([0], np.int64)), _init("ends", np.array([2], np.int64)),
              _init("tail", np.array([4, 4], np.int64)),
              _init("wout", (rng.standard_normal((32, 5)) * 0.2).astype(np.float32)),
              _init("bout", (rng.standard_normal(5) * 0.1).astype(np.float32))]
    nodes += [
        helper.make_node("Shape", [h], ["shp"], name="head/shape"),
        helper.make_node("Slice", ["shp", "starts", "ends"], ["lead"], name="head/slice"),
        helper.make_node("Concat", ["lead", "tail"], ["newshape"], axis=0, name="head/concat"),
        helper.make_node("Reshape", [h, "newshape"], ["grid"], name="head/reshape"),
        helper.make_node("ToyRowMeanTRT", ["grid"], ["rowmean"], name="head/rowmean", domain=rowmean_domain),
        helper.make_node("Flatten", ["rowmean"], ["flat"], axis=1, name="head/flatten"),
        helper.make_node("Gemm", ["flat", "wout", "bout"], ["y"], name="head/gemm"),
    ]
    graph = helper.make_graph(nodes, "toy_plugin_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                          [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(rowmean_domain, 1)]
    model = helper.make_model(graph, opset_imports=imports, producer_name="qdqkit-tests")
    model.ir_version = 8
    return model


def wide_model(target_nodes: int = 10_000, seed: int = 0, width: int = 64, dense: bool = False) -> onnx.ModelProto:
    """A chain of ``target_nodes`` (rounded up to a block of five) small nodes, one ToyScaleTRT per block and a
    ToyRowMeanTRT at the end. x[1,width] -> y[1].

    Weight-light by default (two shared constants: a stress case for per-node costs); with ``dense`` each block
    starts with a MatMul on its own [width, width] weight, as real networks of that size carry weights.
    """
    rng = np.random.default_rng(seed)
    inits = [_init("c_add", rng.standard_normal((1, width)).astype(np.float32) * 0.01),
             _init("c_mul", np.full((1, width), 0.999, np.float32))]
    nodes = []
    h = "x"
    for b in range((target_nodes - 1 + 4) // 5):
        if dense:
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(width))
            inits.append(_init(f"w{b}", w))
            first = helper.make_node("MatMul", [h, f"w{b}"], [f"a{b}"], name=f"n{b}/matmul")
        else:
            first = helper.make_node("Add", [h, "c_add"], [f"a{b}"], name=f"n{b}/add")
        nodes += [
            first,
            helper.make_node("Mul", [f"a{b}", "c_mul"], [f"m{b}"], name=f"n{b}/mul"),
            helper.make_node("ToyScaleTRT", [f"m{b}"], [f"s{b}"], name=f"n{b}/toyscale", scale=1.0, shift=0.0),
            helper.make_node("Tanh", [f"s{b}"], [f"t{b}"], name=f"n{b}/tanh"),
            helper.make_node("Identity", [f"t{b}"], [f"h{b}"], name=f"n{b}/id"),
        ]
        h = f"h{b}"
    nodes.append(helper.make_node("ToyRowMeanTRT", [h], ["y"], name="rowmean", domain="toy.ops"))
    graph = helper.make_graph(nodes, "toy_wide_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("toy.ops", 1)])
    model.ir_version = 8
    return model


def big_model(total_bytes: int, width: int = 4096, seed: int = 0) -> onnx.ModelProto:
    """MatMul layers of [width, width] float32 weights until ``total_bytes`` is reached, each followed by a
    ToyScaleTRT; ends in ToyRowMeanTRT. Past 2 GB it must be saved with external data."""
    rng = np.random.default_rng(seed)
    layer = width * width * 4
    n = max(1, -(-total_bytes // layer))
    nodes, inits = [], []
    h = "x"
    for i in range(n):
        w = rng.standard_normal((width, width), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(width))
        inits.append(_init(f"w{i}", w))
        del w
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"], name=f"l{i}/matmul"),
                  helper.make_node("ToyScaleTRT", [f"mm{i}"], [f"h{i}"], name=f"l{i}/toyscale", scale=1.0, shift=0.0)]
        h = f"h{i}"
    nodes.append(helper.make_node("ToyRowMeanTRT", [h], ["y"], name="rowmean", domain="toy.ops"))
    graph = helper.make_graph(nodes, "toy_big_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("toy.ops", 1)])
    model.ir_version = 8
    return model
