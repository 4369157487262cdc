"""What a Q/DQ model quantizes: Q/DQ counts by op type and INT8 coverage by FLOPs.

INT8 coverage is the share of the multiply-accumulate work of Conv, ConvTranspose, MatMul and Gemm nodes whose
data input and weight input both arrive through a DequantizeLinear (Casts in between are looked through), i.e.
the layers TensorRT can run in INT8 under explicit quantization. The ONNX ``Attention`` op (opset 23, what
PyTorch's dynamo exporter writes for scaled-dot-product attention) counts its two products, Q·Kᵀ and ·V, with Q
and K as its first two inputs, so that a model's coverage does not depend on whether its attention was exported
decomposed (two MatMuls) or whole. FLOPs come from ONNX shape inference (custom ops take part through their
registered schemas); a node whose shapes are unknown counts zero FLOPs and is listed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx

from qdqkit.model import inference_subject, static_shapes

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    # data propagation carries shapes computed at run time (Shape -> Gather -> Concat -> Reshape, as the TorchScript
    # exporter writes attention's head split) through to the MatMuls
    inferred, subject = model, inference_subject(model)  # one copy (of a heavy model) for both tries
    for kwargs in ({"data_prop": True}, {}):
        try:
            inferred = onnx.shape_inference.infer_shapes(subject, **kwargs)
            break
        except Exception:  # noqa: BLE001, S112 - an op whose inference fails leaves its shapes unknown, listed
            continue
    return {name: dims for name, (dims, _) in static_shapes(inferred.graph).items()}


def _flops(node: onnx.NodeProto, shapes: dict[str, Any]) -> int | None:
    out = shapes.get(node.output[0])
    ins = [shapes.get(t) for t in node.input]
    if out is None or any(s is None for s in ins[:2]):
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        w = ins[1]
        # Conv weight [M, C/g, k...]: one MAC per output element per weight slice; ConvTranspose mirrors it.
        per_out = int(np.prod(w[1:])) if node.op_type == "Conv" else int(np.prod(w[2:])) * w[0] // max(out[1], 1)
        return 2 * int(np.prod(out)) * per_out
    if node.op_type == "MatMul":
        return 2 * int(np.prod(out)) * int(ins[0][-1])
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = ins[0][0] if trans_a else ins[0][-1]
        return 2 * int(np.prod(out)) * int(k)
    if node.op_type == "Attention":
        # Q [B, Sq, Hq·Dk] or [B, Hq, Sq, Dk], K [..., Skv, ·], output [B, Sq, Hq·Dv] or [B, Hq, Sq, Dv]: Q·Kᵀ is
        # 2·Skv MACs per element of Q, ·V 2·Skv per element of the output; a past key adds its length to Skv
        kv = int(ins[1][-2])
        past = shapes.get(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if past is not None:
            kv += int(past[-2])
        return 2 * kv * (int(np.prod(ins[0])) + int(np.prod(out)))
    return None


def qdq_summary(model: onnx.ModelProto, registry: Any = None) -> dict[str, Any]:
    """Q/DQ counts by op type and INT8 coverage by FLOPs of a (quantized or float) model.

    ``registry`` (a CustomOpRegistry) lets shape inference see through custom ops. Returns a JSON-ready dict:
    ``quantize_linear``, ``dequantize_linear``, ``dq_inputs_by_op_type`` ({op: {"nodes", "dq_inputs"}}),
    ``int8_coverage`` (0..1 or None when no compute op has known shapes), ``compute`` ({op: {"nodes", "int8",
    "gflops", "int8_gflops"}}), and ``unknown_shape_nodes``.
    """
    if registry is not None:
        registry.register_onnx_schemas()
    g = model.graph
    producer = {t: n for n in g.node for t in n.output}

    def through_cast(t: str) -> onnx.NodeProto | None:
        n = producer.get(t)
        while n is not None and n.op_type == "Cast":
            n = producer.get(n.input[0])
        return n

    counts = Counter(n.op_type for n in g.node)
    by_op: dict[str, dict[str, int]] = {}
    for n in g.node:
        if n.op_type in QDQ_OPS or n.op_type == "Cast":  # a Cast only carries the DQ output on to its consumer
            continue
        k = sum(1 for t in n.input if t and (p := through_cast(t)) is not None and p.op_type == "DequantizeLinear")
        if k:
            e = by_op.setdefault(n.op_type, {"nodes": 0, "dq_inputs": 0})
            e["nodes"] += 1
            e["dq_inputs"] += k
    shapes = _shapes(model)
    compute: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    total = int8 = 0
    for n in g.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        f = _flops(n, shapes)
        quant = all(
            (p := through_cast(t)) is not None and p.op_type == "DequantizeLinear" for t in n.input[:2] if t
        )
        e = compute.setdefault(n.op_type, {"nodes": 0, "int8": 0, "gflops": 0.0, "int8_gflops": 0.0})
        e["nodes"] += 1
        e["int8"] += int(quant)
        if f is None:
            unknown.append(n.name)
            continue
        e["gflops"] += f / 1e9
        total += f
        if quant:
            e["int8_gflops"] += f / 1e9
            int8 += f
    return {
        "quantize_linear": counts.get("QuantizeLinear", 0),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
        "dq_inputs_by_op_type": dict(sorted(by_op.items())),
        "int8_coverage": (int8 / total) if total else None,
        "compute": compute,
        "unknown_shape_nodes": unknown,
    }


def counted_ops(summary: dict[str, Any]) -> str:
    """The op types whose FLOPs a summary's coverage counts, as the model has them: "Conv/MatMul/Gemm"."""
    return "/".join(op for op in COMPUTE_OPS if op in summary["compute"])


def format_summary(summary: dict[str, Any]) -> str:
    """A short human table of `qdq_summary`."""
    cov = summary["int8_coverage"]
    lines = [
        f"Q/DQ: {summary['quantize_linear']} QuantizeLinear, {summary['dequantize_linear']} DequantizeLinear; "
        f"INT8 coverage: {'n/a' if cov is None else f'{100 * cov:.1f}% of {counted_ops(summary)} FLOPs'}",
    ]
    for op, e in summary["compute"].items():
        lines.append(f"  {op:<14} {e['int8']}/{e['nodes']} nodes INT8, {e['int8_gflops']:.4f}/{e['gflops']:.4f} GFLOP")
    if summary["dq_inputs_by_op_type"]:
        lines.append("  DQ-fed inputs: " + ", ".join(f"{op} {e['dq_inputs']}" for op, e in summary["dq_inputs_by_op_type"].items()))
    return "\n".join(lines)
