"""The ``infer-shapes`` pass: every tensor typed and shaped, through custom ops too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qdqkit.customops import NODE_CONTRIB, NODE_UNKNOWN, node_classes
from qdqkit.errors import UserError
from qdqkit import model as qmodel
from qdqkit.pass_infra import Pass, PassContext, PassResult

FALLBACKS = ("error", "run", "guess")


@dataclass
class InferShapesOptions:
    """``fallback`` for custom ops without a spec: "error" (default), "run" (execute the model in onnxruntime
    with the registered CPU kernels and record the actual shapes) or "guess" (each output like the op's first
    input, flagged in the report). ``ort_custom_op_libraries``: extra onnxruntime custom-op libraries that the
    "run" fallback loads. ``data_prop``: onnx data propagation (shape computations through Shape/Gather/...)."""

    fallback: str = "error"
    ort_custom_op_libraries: list[str] = field(default_factory=list)
    data_prop: bool = True


class InferShapesPass(Pass):
    """Type and shape every tensor with onnx shape inference and the registered custom-op specs.

    1. Custom ops with a spec are inferred through their registered schema (the spec's ``infer``).
    2. A custom op without a spec stops the pass with an error naming the op and how to register one, unless
       ``fallback`` is "run" (actual shapes from one onnxruntime run on zero-filled inputs) or "guess" (outputs
       copied from the first input, every guess listed in the stats under ``guessed``). The fallbacks also
       cover onnxruntime contrib ops whose outputs onnx cannot type (without a fallback they are only counted).
    3. Inference runs on a copy without large weights, so models over 2 GB work; only ``value_info`` and the
       graph outputs' types of the model are rewritten.
    ``modified`` is True when ``value_info`` or an output type changed. Tensors still lacking a type or a shape
    are counted in the stats (``untyped`` / ``unshaped``) with up to ten names each.
    """

    name = "infer-shapes"
    summary = "onnx shape inference with data propagation through registered custom ops (fallback: run, guess)"
    requires = frozenset({"custom-ops-known"})
    provides = frozenset({"shapes"})
    Options = InferShapesOptions

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        opts = self.options
        if opts.fallback not in FALLBACKS:
            raise UserError(f"infer-shapes: fallback must be one of {', '.join(FALLBACKS)}, got {opts.fallback!r}")
        proto = model.proto
        classes = node_classes(proto.graph, ctx.custom_ops)
        unknown = [n for n, c in zip(proto.graph.node, classes) if c == NODE_UNKNOWN]
        if unknown and opts.fallback == "error":
            ops = sorted({_label(n) for n in unknown})
            raise UserError(
                f"cannot infer shapes through custom op(s) {', '.join(ops)}: no CustomOpSpec is registered; "
                "add one through the qdqkit_register_custom_ops hook of a plugin, or use the infer-shapes option "
                "fallback=\"run\" (or \"guess\"), e.g. `--shape-fallback run`"
            )
        stats: dict[str, Any] = {}
        inferred = _infer(proto, [], opts.data_prop)
        if opts.fallback != "error":
            # onnxruntime contrib ops have no onnx schema either: treat those left untyped like unknown ops
            typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output)
                     if v.type.tensor_type.elem_type}
            contrib = [n for n, c in zip(proto.graph.node, classes)
                       if c == NODE_CONTRIB and any(o and o not in typed for o in n.output)]
            chosen = {id(n) for n in (*unknown, *contrib)}
            targets = [n for n in proto.graph.node if id(n) in chosen]
            if targets and opts.fallback == "run":
                hints = _measure(proto, targets, ctx, opts.ort_custom_op_libraries)
                stats["measured"] = len(hints)
                inferred = _infer(proto, hints, opts.data_prop)
            elif targets:
                guesses = _guess(inferred, targets)
                stats["guessed"] = [{"tensor": g.name, "op": op} for g, op in guesses]
                inferred = _infer(proto, [g for g, _ in guesses], opts.data_prop)
        modified = qmodel.adopt_inferred(proto, inferred)
        untyped, unshaped = _gaps(proto)
        stats.update({"value_info": len(proto.graph.value_info), "untyped": len(untyped),
                      "unshaped": len(unshaped)})
        if untyped:
            stats["untyped_names"] = untyped[:10]
        if unshaped:
            stats["unshaped_names"] = unshaped[:10]
        if stats.get("guessed"):
            ctx.state.setdefault(self.name, {})["guessed"] = stats["guessed"]
        return PassResult(modified=modified, stats=stats)


def _label(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _infer(proto: onnx.ModelProto, hints: list[onnx.ValueInfoProto], data_prop: bool) -> onnx.ModelProto:
    subject = qmodel.inference_subject(proto, hints=hints)  # one copy for both tries
    try:
        return onnx.shape_inference.infer_shapes(subject, check_type=True, strict_mode=True, data_prop=data_prop)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "No Op registered" in first or "is not a registered" in first:
            return onnx.shape_inference.infer_shapes(subject, check_type=False, strict_mode=False,
                                                     data_prop=data_prop)
        raise UserError(f"shape inference failed: {first}") from None


def _gaps(proto: onnx.ModelProto) -> tuple[list[str], list[str]]:
    typed: set[str] = set()
    shaped: set[str] = set()
    for v in (*proto.graph.value_info, *proto.graph.output, *proto.graph.input):
        tt = v.type.tensor_type
        if tt.elem_type:
            typed.add(v.name)
            if tt.HasField("shape"):
                shaped.add(v.name)
    produced = [name for node in proto.graph.node for name in node.output if name]
    untyped = [n for n in produced if n not in typed]
    unshaped = [n for n in produced if n in typed and n not in shaped]
    return untyped, unshaped


def _measure(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], ctx: PassContext,
             libraries: list[str]) -> list[onnx.ValueInfoProto]:
    """Run the model once on zero-filled inputs and return the actual type and shape of the unknown ops' outputs."""
    import onnxruntime as ort

    wanted = [o for n in nodes for o in n.output if o]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in present:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    for lib in libraries:
        opts.register_custom_ops_library(lib)
    feeds = {}
    initializers = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        feeds[inp.name] = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        session = ctx.custom_ops.session(probe, sess_options=opts)
        values = session.run(wanted, feeds)
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        ops = sorted({_label(n) for n in nodes})
        raise UserError(
            f"infer-shapes fallback \"run\" could not execute custom op(s) {', '.join(ops)} in onnxruntime "
            f"({first}); give their kernel library with the option ort_custom_op_libraries, or register a spec"
        ) from None
    out = []
    for name, value in zip(wanted, values):
        arr = np.asarray(value)
        out.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    return out


def _guess(inferred: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[tuple[onnx.ValueInfoProto, str]]:
    known = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    for t in inferred.graph.initializer:
        known.setdefault(t.name, helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    guesses = []
    for node in nodes:
        first = known.get(node.input[0]) if node.input else None
        for name in node.output:
            if not name or first is None:
                continue
            v = onnx.ValueInfoProto()
            v.CopyFrom(first)
            v.name = name
            guesses.append((v, _label(node)))
            known[name] = v
    return guesses
