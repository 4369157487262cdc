"""Seeded generators of the small models the qdq/validate tests run on.

`transformer_msda` is a plugin-laden transformer in miniature: a convolutional stem, then two blocks of
[LayerNorm → multi-head attention (standard MatMul/Softmax/MatMul) → residual Add → LayerNorm → deformable
attention through ``MultiScaleDeformableAttnTRT2`` (domain "", as the BEVFormer exporters write it) → output
projection → residual Add], then a head. Block 0 uses ``LayerNormalization``, block 1 the decomposed form, so
both spellings of the pattern are exercised. Weights are seeded; the model calibrates and validates in seconds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MSDA = "MultiScaleDeformableAttnTRT2"
IMG = (1, 3, 16, 16)
C = 32          # token width
MHA_HEADS, MHA_DIM = 2, 16
MSDA_HEADS, MSDA_DIM, POINTS = 4, 8, 4
GRID = 8        # the stem's output is GRID x GRID tokens
TOKENS = GRID * GRID
CLASSES = 10


class _Builder:
    def __init__(self, seed: int, grid: int = GRID, width: int = C) -> None:
        self.rng = np.random.default_rng(seed)
        self.grid, self.width, self.tokens = grid, width, grid * grid
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
        scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs: list[str], name: str, domain: str = "", n_out: int = 1, **attrs) -> str | list[str]:
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, name: str, n_in: int, n_out: int, scale: float | None = None) -> str:
        w = self.weight(f"{name}.weight", (n_in, n_out), scale)
        b = self.const(f"{name}.bias", (self.rng.standard_normal(n_out) * 0.02).astype(np.float32))
        y = self.node("MatMul", [x, w], f"{name}/MatMul")
        return self.node("Add", [y, b], f"{name}/Add")

    def shape(self, name: str, dims: list[int]) -> str:
        return self.const(name, np.array(dims, dtype=np.int64))

    def layernorm(self, x: str, name: str, fused: bool) -> str:
        c = self.width
        gamma = self.const(f"{name}.gamma", (1 + 0.1 * self.rng.standard_normal(c)).astype(np.float32))
        beta = self.const(f"{name}.beta", (0.05 * self.rng.standard_normal(c)).astype(np.float32))
        if fused:
            return self.node("LayerNormalization", [x, gamma, beta], f"{name}/LayerNorm", axis=-1, epsilon=1e-5)
        mean = self.node("ReduceMean", [x], f"{name}/ReduceMean", axes=[-1])
        d = self.node("Sub", [x, mean], f"{name}/Sub")
        two = self.const(f"{name}.two", np.array(2.0, dtype=np.float32))
        sq = self.node("Pow", [d, two], f"{name}/Pow")
        var = self.node("ReduceMean", [sq], f"{name}/ReduceMean_1", axes=[-1])
        eps = self.const(f"{name}.eps", np.array(1e-5, dtype=np.float32))
        ve = self.node("Add", [var, eps], f"{name}/Add")
        sd = self.node("Sqrt", [ve], f"{name}/Sqrt")
        n = self.node("Div", [d, sd], f"{name}/Div")
        g = self.node("Mul", [n, gamma], f"{name}/Mul")
        return self.node("Add", [g, beta], f"{name}/Add_1")


def _mha(b: _Builder, x: str, name: str) -> str:
    C, TOKENS, MHA_DIM = b.width, b.tokens, b.width // MHA_HEADS
    q = b.linear(x, f"{name}/q_proj", C, C)
    k = b.linear(x, f"{name}/k_proj", C, C)
    v = b.linear(x, f"{name}/v_proj", C, C)
    heads = b.shape(f"{name}.heads", [1, TOKENS, MHA_HEADS, MHA_DIM])
    qh = b.node("Transpose", [b.node("Reshape", [q, heads], f"{name}/q_reshape")], f"{name}/q_t", perm=[0, 2, 1, 3])
    kh = b.node("Transpose", [b.node("Reshape", [k, heads], f"{name}/k_reshape")], f"{name}/k_t", perm=[0, 2, 3, 1])
    vh = b.node("Transpose", [b.node("Reshape", [v, heads], f"{name}/v_reshape")], f"{name}/v_t", perm=[0, 2, 1, 3])
    s = b.node("MatMul", [qh, kh], f"{name}/scores")
    scale = b.const(f"{name}.scale", np.array(1 / np.sqrt(MHA_DIM), dtype=np.float32))
    s = b.node("Mul", [s, scale], f"{name}/scale")
    p = b.node("Softmax", [s], f"{name}/softmax", axis=-1)
    o = b.node("MatMul", [p, vh], f"{name}/context")
    o = b.node("Transpose", [o], f"{name}/o_t", perm=[0, 2, 1, 3])
    o = b.node("Reshape", [o, b.shape(f"{name}.merge", [1, TOKENS, C])], f"{name}/merge")
    return b.linear(o, f"{name}/out_proj", C, C)


def _msda(b: _Builder, x: str, name: str, ref: str, shapes: str) -> str:
    C, TOKENS, MSDA_DIM = b.width, b.tokens, b.width // MSDA_HEADS
    value = b.linear(x, f"{name}/value_proj", C, MSDA_HEADS * MSDA_DIM)
    value = b.node("Reshape", [value, b.shape(f"{name}.vshape", [1, TOKENS, MSDA_HEADS, MSDA_DIM])], f"{name}/value")
    off = b.linear(x, f"{name}/offset_proj", C, MSDA_HEADS * POINTS * 2, scale=0.3)
    off = b.node("Reshape", [off, b.shape(f"{name}.oshape", [1, TOKENS, MSDA_HEADS, POINTS * 2])], f"{name}/offsets")
    att = b.linear(x, f"{name}/weight_proj", C, MSDA_HEADS * POINTS)
    att = b.node("Reshape", [att, b.shape(f"{name}.ashape", [1, TOKENS, MSDA_HEADS, POINTS])], f"{name}/weights")
    y = b.node(MSDA, [value, shapes, ref, off, att], f"{name}/{MSDA}")
    y = b.node("Reshape", [y, b.shape(f"{name}.flat", [1, TOKENS, C])], f"{name}/flatten")
    return b.linear(y, f"{name}/output_proj", C, C)


def transformer_msda(seed: int = 0, opset: int = 17, grid: int = GRID, width: int = C) -> onnx.ModelProto:
    """The plugin-laden transformer described in the module docstring.

    Input ``image`` [1,3,2*grid,2*grid]; outputs ``logits`` [1,10] and ``tokens`` [1,grid*grid,width] (the last
    block's output). The defaults (grid 8, width 32) make the test model; benchmarks use larger ones.
    """
    C, GRID, TOKENS = width, grid, grid * grid
    b = _Builder(seed, grid, width)
    w1 = b.weight("stem.conv1.weight", (16, 3, 3, 3))
    x = b.node("Conv", ["image", w1, b.const("stem.conv1.bias", np.zeros(16, np.float32))], "stem/conv1",
               pads=[1, 1, 1, 1], strides=[2, 2])
    x = b.node("Relu", [x], "stem/relu1")
    w2 = b.weight("stem.conv2.weight", (C, 16, 3, 3))
    x = b.node("Conv", [x, w2, b.const("stem.conv2.bias", np.zeros(C, np.float32))], "stem/conv2", pads=[1, 1, 1, 1])
    x = b.node("Relu", [x], "stem/relu2")
    x = b.node("Reshape", [x, b.shape("stem.flat", [1, C, TOKENS])], "stem/flatten")
    x = b.node("Transpose", [x], "stem/tokens", perm=[0, 2, 1])
    shapes = b.const("msda.spatial_shapes", np.array([[GRID, GRID]], dtype=np.int64))
    centres = (np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="xy"), -1).reshape(-1, 2) + 0.5) / GRID
    ref = b.const("msda.reference_points", centres.reshape(1, TOKENS, 1, 2).astype(np.float32))
    for i in range(2):
        h = b.layernorm(x, f"block{i}/ln1", fused=(i == 0))
        x = b.node("Add", [x, _mha(b, h, f"block{i}/attn")], f"block{i}/residual1")
        h = b.layernorm(x, f"block{i}/ln2", fused=(i == 0))
        x = b.node("Add", [x, _msda(b, h, f"block{i}/msda", ref, shapes)], f"block{i}/residual2")
    b.nodes.append(helper.make_node("Identity", [x], ["tokens"], name="head/tokens"))
    pooled = b.node("ReduceMean", [x], "head/pool", axes=[1], keepdims=0)
    logits = b.linear(pooled, "head/fc", C, CLASSES)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="head/logits"))
    graph = helper.make_graph(
        b.nodes, "transformer_msda",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 2 * grid, 2 * grid])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES]),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, TOKENS, C])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qdqkit-tests")
    model.ir_version = 8
    return model


def calibration_images(n: int, seed: int = 1, size: int = IMG[2]) -> np.ndarray:
    """``n`` samples for ``image`` concatenated along axis 0 (smooth blobs plus noise, not pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        cx, cy, f = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(2, 6)
        base = np.sin(f * (xx - cx)) * np.cos(f * (yy - cy))
        out[i] = base[None] * rng.uniform(0.5, 1.5, (3, 1, 1)) + 0.2 * rng.standard_normal((3, size, size))
    return out


def write_case(folder, samples: int, npy_folder: bool = False):
    """The test model as ``folder/model.onnx`` and ``samples`` calibration images as ``folder/calib.npz`` (and as
    ``folder/folder/image.npy`` where asked); returns ``folder``."""
    from pathlib import Path

    folder = Path(folder)
    onnx.save(transformer_msda(), folder / "model.onnx")
    images = calibration_images(samples)
    np.savez(folder / "calib.npz", image=images)
    if npy_folder:
        (folder / "folder").mkdir()
        np.save(folder / "folder" / "image.npy", images)
    return folder


def plain_cnn(seed: int = 0) -> onnx.ModelProto:
    """A model with no custom op (Conv → Relu → Conv → flatten → MatMul), for the rule and backend tests."""
    b = _Builder(seed)
    x = b.node("Conv", ["image", b.weight("c1.w", (16, 3, 3, 3))], "conv1", pads=[1, 1, 1, 1])
    x = b.node("Relu", [x], "relu1")
    x = b.node("Conv", [x, b.weight("c2.w", (16, 16, 3, 3))], "conv2", pads=[1, 1, 1, 1], strides=[2, 2])
    x = b.node("Reshape", [x, b.shape("flat", [1, 16 * 64])], "flatten")
    x = b.linear(x, "fc", 16 * 64, 32)
    b.nodes.append(helper.make_node("Identity", [x], ["out"], name="out"))
    graph = helper.make_graph(
        b.nodes, "plain_cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(IMG))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 32])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qdqkit-tests")
    model.ir_version = 8
    return model
