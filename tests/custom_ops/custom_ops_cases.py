"""Seeded inputs and one-node models shared by the custom-op tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from qdqkit.custom_ops import plugin

from qdqkit.customops import CustomOpRegistry

# BEVFormer-tiny's 12 MSDA calls (bevformer-tiny.md §4.2): name -> (B, spatial_shapes, Q, M, D, G, P)
BEVFORMER_TINY_MSDA = {
    "tsa": (2, [[50, 50]], 2500, 8, 32, 1, 4),
    "sca": (6, [[15, 25]], 2500, 8, 32, 4, 8),
    "decoder": (1, [[50, 50]], 900, 8, 32, 1, 4),
}
# odd sizes: several levels, odd D/P/G, a 1-pixel level
ODD_MSDA = {
    "odd-levels": (2, [[7, 5], [3, 4], [1, 1]], 11, 3, 5, 3, 3),
    "odd-single": (1, [[1, 9]], 4, 1, 1, 1, 1),
    "odd-groups": (3, [[4, 6], [2, 3]], 13, 2, 7, 2, 6),
}


def registry() -> CustomOpRegistry:
    """A registry holding exactly the bevformer-ops plugin's specs, schemas registered."""
    reg = CustomOpRegistry()
    plugin.qdqkit_register_custom_ops(reg)
    reg.register_onnx_schemas()
    return reg


def msda_inputs(case, seed: int = 0, spread: float = 0.15, dtype=np.float32):
    """Inputs with reference points reaching past the border and offsets of several pixels (some points fall
    outside, some on the border)."""
    B, shapes, Q, M, D, G, P = case
    rng = np.random.default_rng(seed)
    shapes = np.asarray(shapes, dtype=np.int64)
    L = len(shapes)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = rng.standard_normal((B, S, M, D))
    ref = rng.uniform(-spread, 1 + spread, (B, Q, 1, 2 * G))
    offsets = rng.normal(0.0, 2.0, (B, Q, M, L * P * 2))
    weights = rng.standard_normal((B, Q, M, L * P)) * 2
    return [value.astype(dtype), shapes, ref.astype(dtype), offsets.astype(dtype), weights.astype(dtype)]


def one_node_model(
    op_type: str, inputs: list[np.ndarray], attrs: dict, opset: int, domain: str = ""
) -> onnx.ModelProto:
    """A model of a single custom node with typed, shaped inputs and an output of unknown dimensions."""
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op_type, names, ["out"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        op_type,
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, inputs)
        ],
        [
            helper.make_tensor_value_info(
                "out", helper.np_dtype_to_tensor_dtype(inputs[0].dtype), [None] * inputs[0].ndim
            )
        ],  # every op keeps input 0's rank
    )
    imports = [helper.make_opsetid("", opset)]
    if domain:
        imports.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def run_cpu(reg: CustomOpRegistry, model: onnx.ModelProto, inputs: list[np.ndarray]) -> np.ndarray:
    """Run a model through the registry's CPU execution support (the ONNX functions) in onnxruntime."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = reg.session(model, sess_options=opts)
    feed = {i.name: a for i, a in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)[0]
