"""The ``simplify`` pass: onnxsim with the custom ops preserved and checked."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from qdqkit.customops import classify_nodes
from qdqkit.model import is_large
from qdqkit.pass_infra import Pass, PassContext, PassResult


@dataclass
class SimplifyOptions:
    """``check_runs``: random-input runs comparing the simplified model to the original in onnxruntime with the
    registered CPU kernels (0 turns the numeric check off). The largest difference of an output may be at most
    ``atol + rtol * max|output|``."""

    check_runs: int = 1
    rtol: float = 1e-3
    atol: float = 1e-5
    seed: int = 0


class SimplifyPass(Pass):
    """Constant folding and graph clean-up by onnxsim, with the custom ops kept intact.

    1. onnxsim runs with the registered custom-op schemas (it never folds ops of non-official domains).
    2. The result is accepted only if every custom node survived (same count per ``domain::op_type``) and the
       model still passes the checker; with ``check_runs`` > 0 both models also run in onnxruntime (custom ops
       through their CPU implementations) on the same random inputs and must agree within ``rtol``/``atol``.
    3. It is skipped, with the reason in the stats (``skipped``), where onnxsim cannot work: models over 2 GB,
       an onnxsim error, or onnxsim reporting that its own check failed. A skip leaves the model unchanged.
    ``modified`` is True when onnxsim's result was adopted and differs from the input. A numeric disagreement
    beyond ``atol + rtol * max|output|`` is also a skip (the unsimplified model is kept), named in the stats.
    """

    name = "simplify"
    summary = "onnxsim constant folding and clean-up with custom ops preserved and checked"
    requires = frozenset({"custom-ops-known"})
    provides = frozenset({"simplified"})
    Options = SimplifyOptions

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        proto = model.proto
        if is_large(proto):
            return _skip("model over 2 GB: onnxsim serializes the model whole")
        try:
            import onnxsim
        except ImportError as exc:
            return _skip(f"onnxsim is not installed ({exc})")
        ctx.custom_ops.register_onnx_schemas()
        custom_before = _custom_counts(proto, ctx)
        try:
            simplified, ok = onnxsim.simplify(proto, check_n=0)
        except Exception as exc:  # onnxsim raises plain RuntimeErrors from its C++ core
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return _skip(f"onnxsim failed: {first[:200]}")
        if not ok:
            return _skip("onnxsim reported that its result failed its own check")
        custom_after = _custom_counts(simplified, ctx)
        if custom_after != custom_before:
            return _skip(f"onnxsim changed the custom ops ({dict(custom_before)} -> {dict(custom_after)})")
        try:
            onnx.checker.check_model(simplified)
        except onnx.checker.ValidationError as exc:
            return _skip(f"onnxsim's result fails the checker: {str(exc).splitlines()[0]}")
        if self.options.check_runs > 0:
            mismatch = _compare(proto, simplified, ctx, self.options)
            if mismatch:
                return _skip(mismatch)
        changed = simplified.SerializeToString() != proto.SerializeToString()
        stats = {"nodes_before": len(proto.graph.node), "nodes_after": len(simplified.graph.node),
                 "custom_ops": sum(custom_after.values())}
        if changed:
            model.set_proto(simplified)
        return PassResult(modified=changed, stats=stats)


def _skip(reason: str) -> PassResult:
    return PassResult(modified=False, stats={"skipped": reason})


def _custom_counts(proto: onnx.ModelProto, ctx: PassContext) -> Counter:
    census = classify_nodes(proto, ctx.custom_ops)
    return Counter(f"{e['domain']}::{e['op_type']}" for e in census["nodes"].values()
                   if e["class"] in ("known-custom", "unknown-custom"))


def _compare(before: onnx.ModelProto, after: onnx.ModelProto, ctx: PassContext, opts: SimplifyOptions) -> str | None:
    """None when both models agree on random inputs, else the reason they do not (one line)."""
    rng = np.random.default_rng(opts.seed)
    a = ctx.custom_ops.session(before)
    b = ctx.custom_ops.session(after)
    names = [o.name for o in after.graph.output]
    for _ in range(opts.check_runs):
        feeds = {}
        for inp in a.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            dtype = np.dtype(_ORT_TYPES.get(inp.type, "float32"))
            feeds[inp.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                               else np.zeros(shape, dtype))
        ra = dict(zip([o.name for o in a.get_outputs()], a.run(None, feeds)))
        rb = dict(zip(names, b.run(names, feeds)))
        for name in names:
            if name not in ra:
                continue
            want, got = np.asarray(ra[name], np.float64), np.asarray(rb[name], np.float64)
            if want.shape != got.shape:
                return f"onnxsim's result changes the shape of output '{name}' ({want.shape} -> {got.shape})"
            # tolerance relative to the output's scale: folding reorders float arithmetic in deep models
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            worst = float(np.max(np.abs(want - got))) if want.size else 0.0
            if not np.isfinite(worst) or worst > opts.atol + opts.rtol * scale:
                return (f"onnxsim's result differs from the input model on output '{name}' (max abs diff "
                        f"{worst:.3g} at output scale {scale:.3g}, allowed {opts.atol + opts.rtol * scale:.3g})")
    return None


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
