"""The ``fp16`` pass: a float model typed FP16 for a strongly typed TensorRT build, by ModelOpt's AutoCast, with
the nodes that FP16 would hurt kept in FP32 (by rule, by measured range, by initializer range, by plugin format)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qdqkit.calib import model_inputs, resolve_source
from qdqkit.coverage import QDQ_OPS
from qdqkit.customops import bodies, default_opset, iter_nodes
from qdqkit.errors import UserError
from qdqkit.pass_infra import Pass, PassContext, PassResult
from qdqkit.precision import (
    FLOAT_ELEM_TYPES,
    as_trt_would_see_it,
    check_plugin_precision,
    check_runnable,
    computed_types,
    float_tensors,
    name_nodes,
    restore_domains,
    tensor_ranges,
    tensor_types,
)
from qdqkit.quant_backends import float_io, modelopt_call, plugin_precision_plan
from qdqkit.rules import ExclusionRules, RuleOptions

STATE_KEY = "fp16"
_FP16_MAX = float(np.finfo(np.float16).max)
# the output's least opset: CastLike (15) lets the custom ops' CPU functions return FP16 for FP16 inputs, and the
# LayerNormalization that AutoCast makes of a decomposed one is 17
_MIN_OPSET = 17


@dataclass
class Fp16Options(RuleOptions):
    """Options of the ``fp16`` pass (CLI flags and TOML keys of the same names map onto these).

    The exclusion rules (``exclude_*``, ``optional_rules``) name nodes kept in FP32, as for ``qdq``. With
    calibration data, ``calib_samples`` samples are run first and every node with an input or output whose magnitude
    exceeds ``data_max`` stays FP32; without it no activation is checked (the report says so). A node with an
    initializer beyond ``init_max`` stays FP32. ``keep_io_types`` keeps the model's inputs and outputs float32.
    ``plugin_precision`` maps a custom op type to "fp16" or "fp32" (every float input and output).
    """

    calib_samples: int = 16
    data_max: float = 512.0
    init_max: float = _FP16_MAX
    keep_io_types: bool = True
    plugin_precision: dict[str, str] = field(default_factory=dict)


class Fp16Pass(Pass):
    """Type everything FP16 except what must stay FP32, as TensorRT 11's strongly typed builds need it.

    1. The model must be float (a model with Q/DQ goes through ``qdq --high-precision fp16`` instead).
    2. Nodes kept in FP32, each with its reason: matched by an exclusion rule; an input or output beyond
       ``data_max`` on the calibration samples (measured in onnxruntime through the custom-op kernels, two
       numbers a tensor a sample); an initializer beyond ``init_max``; a custom op whose planned precision is
       fp32 (its TensorRT formats, its CPU kernel, or ``plugin_precision``).
    3. ModelOpt's AutoCast converts a private copy in which custom ops sit in ``trt.plugins`` with typed, shaped
       outputs, and inserts the Casts between the two precisions; domains are restored afterwards.
    4. Every custom node is checked for the precision planned for it; the report lists the FP32 nodes by reason.
    Samples ``[0, calib_samples)`` measure ranges; ``validate`` takes the ones after them.
    """

    name = "fp16"
    summary = "type the model FP16 for strongly typed TensorRT (ModelOpt AutoCast); out-of-range nodes stay FP32"
    requires = frozenset()
    provides = frozenset({"reduced-precision"})
    Options = Fp16Options

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        o = self.options
        _check_options(o)
        registry = ctx.custom_ops
        registry.register_onnx_schemas()
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        if any(n.op_type in QDQ_OPS for n in proto.graph.node):
            raise UserError("the fp16 pass types a float model, and this one has Q/DQ nodes: for INT8 with FP16 "
                            "elsewhere use `qdq --high-precision fp16` instead")
        renamed = name_nodes(proto)
        # AutoCast types every op from its schema: an op qdqkit knows nothing about cannot be planned
        check_runnable(proto, registry, purpose="FP16 typing needs its types and TensorRT formats", kernels=False)

        rules = ExclusionRules.from_rule_options(o)
        resolution = rules.resolve(proto, ctx.registries.get("rules"))
        _check_whole_op(o.plugin_precision)
        flags, plan = plugin_precision_plan(proto, registry, "fp16", o.plugin_precision)
        work, domains = as_trt_would_see_it(proto, registry, before="FP16 typing")

        ranges: dict[str, tuple[float, float]] = {}
        source = None
        t0 = time.perf_counter()
        if ctx.calib_spec:
            check_runnable(proto, registry, purpose="measuring value ranges runs the model")
            source = resolve_source(ctx.calib_spec, model_inputs(proto), ctx.hook)
            ctx.say(f"fp16: measuring value ranges on {o.calib_samples} samples of {source.describe()}")
            ranges = tensor_ranges(proto, registry, source, 0, o.calib_samples, float_tensors(work))
        range_seconds = time.perf_counter() - t0

        beyond = {t for t, (lo, hi) in ranges.items() if _beyond(lo, hi, o.data_max)}
        big = _big_constants(work, o.init_max)
        keep, reasons = _fp32_nodes(work, set(resolution.excluded), beyond, big, plan, registry)
        kept_plan = _kept_custom_nodes(work, keep, reasons, registry)
        t0 = time.perf_counter()
        converted = _autocast(work, keep, beyond | big, o.init_max, o.keep_io_types, ctx)
        convert_seconds = time.perf_counter() - t0
        restore_domains(converted, domains)
        registry.strip_functions(converted)
        types = tensor_types(converted)
        # with FP16 I/O asked for, the model's inputs and outputs are FP16 however large (the user's choice)
        io = set() if o.keep_io_types else {v.name for v in (*converted.graph.input, *converted.graph.output)}
        _check_kept(converted, types, keep, beyond | big, io)
        plugin_check = check_plugin_precision(converted, registry, plan, kept_plan, types)

        ctx.state[STATE_KEY] = {"float_model": proto, "source": source, "calib_samples": o.calib_samples if source else 0}
        model.set_proto(converted)
        fp32_out = sorted(n.name for n in converted.graph.node if n.op_type != "Cast"
                          and any(types.get(t) == onnx.TensorProto.FLOAT for t in n.output))
        present = {n.name for n in converted.graph.node}
        stats = {
            "ranges": {"source": source.describe() if source else None, "samples": o.calib_samples if source else 0,
                       "tensors": len(ranges), "data_max": o.data_max,
                       "beyond_data_max": sorted(beyond)},
            "rules": resolution.to_dict(),
            "fp32_nodes": {reason: sorted(names) for reason, names in reasons.items()},
            # what the output holds: nodes computing float32 (Casts aside), and kept nodes AutoCast's clean-up
            # replaced (a decomposed LayerNorm fused into one node is judged by its own inputs and outputs)
            "fp32_in_output": fp32_out,
            "replaced_by_autocast": sorted(keep - present),
            "nodes": len(converted.graph.node),
            "casts": sum(n.op_type == "Cast" for n in converted.graph.node) -
            sum(n.op_type == "Cast" for n in proto.graph.node),
            "tensors_by_precision": computed_types(converted, types),
            "plugin_precision": plan,
            "plugin_precision_flags": flags,
            "plugin_check": plugin_check,
            "keep_io_types": o.keep_io_types,
            "named_nodes": renamed,
            "seconds": {"ranges": round(range_seconds, 3), "autocast": round(convert_seconds, 3)},
            "notes": ([] if source else [("no calibration data: activations were not checked against data_max; "
                                          "give --calib to keep nodes with large values in FP32")])
            + _subgraph_note(converted),
        }
        return PassResult(modified=True, stats=stats)


def _check_options(o: Fp16Options) -> None:
    if not isinstance(o.calib_samples, int) or o.calib_samples < 1:
        raise UserError(f"fp16: calib_samples must be a positive integer, got {o.calib_samples!r}")
    for key in ("data_max", "init_max"):
        value = getattr(o, key)
        if not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"fp16: {key} must be a positive number, got {value!r}")


def _check_whole_op(overrides: dict[str, str]) -> None:
    """The fp16 pass sets a custom op's precision as a whole: "fp16" or "fp32" (per-input plans are qdq's; a bare
    precision already means the whole op to plugin_precision_plan)."""
    for op, value in overrides.items():
        if value not in ("fp16", "fp32"):
            raise UserError(f"fp16: plugin precision of {op} must be 'fp16' or 'fp32' (the whole op), got '{value}'")


def _beyond(lo: float, hi: float, data_max: float) -> bool:
    """A measured range FP16 must not hold: a magnitude past ``data_max`` (an infinity included), or NaN extremes
    where the measurement returned them (an empty tensor's range, (inf, -inf), holds nothing)."""
    return bool(np.isnan(lo) or np.isnan(hi) or (lo <= hi and max(abs(lo), abs(hi)) > data_max))


# ops that pass a constant's values on unchanged: their outputs are as large as the constant
_VALUE_PRESERVING = frozenset({"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten",
                               "Expand"})


def _big_constants(model: onnx.ModelProto, init_max: float) -> set[str]:
    """Constants with a value beyond ``init_max`` and what the graph makes of them: float initializers, Constant
    outputs (``value``, ``value_float``, ``value_floats``), ConstantOfShape outputs, the outputs of Casts, reshapes
    and the like of a large tensor, and the outputs of any node computed from constants alone when one of them is
    large (conservative: ``Mul(big, 1e-9)`` counts as large). AutoCast's clean-up may fold some of these: the rule
    must hold whichever name survives."""
    from onnx import numpy_helper

    def large(t: onnx.TensorProto) -> bool:
        if t.data_type not in FLOAT_ELEM_TYPES:
            return False
        a = numpy_helper.to_array(t)
        return bool(a.size and np.nanmax(np.abs(a)) > init_max)

    def attribute_large(a: onnx.AttributeProto) -> bool:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return large(a.t)
        if a.name == "value_float":
            return abs(a.f) > init_max
        if a.name == "value_floats":
            return any(abs(v) > init_max for v in a.floats)
        return False

    constant = {t.name for t in model.graph.initializer}
    big = {t.name for t in model.graph.initializer if large(t)}
    for n in model.graph.node:
        from_constants = all(t in constant for t in n.input if t)
        if n.op_type in ("Constant", "ConstantOfShape") and from_constants:
            constant.update(n.output)
            if any(attribute_large(a) for a in n.attribute):
                big.update(n.output)
        elif n.op_type in _VALUE_PRESERVING and n.input and n.input[0] in big:
            big.update(n.output)
            if from_constants:
                constant.update(n.output)
        elif from_constants and n.input:
            constant.update(n.output)
            if any(t in big for t in n.input):
                big.update(n.output)
    return big


def _subgraph_note(model: onnx.ModelProto) -> list[str]:
    """A note naming the main-graph nodes with bodies (If, Loop, Scan): AutoCast leaves every node of a body as it
    is (FP32), so neither their ranges nor the rules are judged there, and the report should say so."""
    parents = sorted(n.name for n in model.graph.node if next(bodies(n), None) is not None)
    if not parents:
        return []
    inner = sum(1 for _ in iter_nodes(model.graph)) - len(model.graph.node)
    return [(f"{inner} nodes inside the bodies of {', '.join(parents)} stay FP32 as they are (AutoCast leaves "
             "subgraphs untyped; their ranges were not measured)")]


def _fp32_nodes(model: onnx.ModelProto, excluded: set[str], beyond: set[str], big: set[str],
                plan: dict[str, dict[str, str]], registry: Any) -> tuple[set[str], dict[str, list[str]]]:
    """The nodes to keep in FP32, and the reasons (the first that applies, in the order of the class docstring):
    ``beyond`` holds the tensors whose measured range FP16 must not hold, ``big`` the constants it cannot."""
    fp32_plugins = {node.name for node, _ in registry.custom_nodes(model)
                    if any(p == "fp32" for p in plan.get(node.op_type, {}).values())}
    reasons: dict[str, list[str]] = {"rule": [], "range": [], "initializer": [], "plugin": []}
    for n in model.graph.node:
        if n.name in excluded:
            reasons["rule"].append(n.name)
        elif any(t in beyond for t in list(n.input) + list(n.output)):
            reasons["range"].append(n.name)
        elif any(t in big for t in list(n.input) + list(n.output)):
            reasons["initializer"].append(n.name)
        elif n.name in fp32_plugins:
            reasons["plugin"].append(n.name)
    return {name for names in reasons.values() for name in names}, reasons


def _kept_custom_nodes(model: onnx.ModelProto, keep: set[str], reasons: dict[str, list[str]],
                       registry: Any) -> dict[str, dict[str, str]]:
    """The plan of each custom node kept in FP32 (AutoCast keeps a node whole): every float input and output fp32,
    which its TensorRT formats must allow. A plugin whose formats need FP16 on some float input or output and FP32
    on others cannot be typed by this pass, which sets a custom op's precision as a whole."""
    why = {name: reason for reason, names in reasons.items() for name in names}
    _, fp32_plan = plugin_precision_plan(model, registry, "fp32", {})
    out: dict[str, dict[str, str]] = {}
    for node, spec in registry.custom_nodes(model):
        if node.name not in keep:
            continue
        floats = {io.name for io in (*spec.inputs, *spec.outputs) if float_io(io)}
        want = fp32_plan.get(node.op_type, {})
        not_fp32 = sorted(io for io in floats if want.get(io) != "fp32")
        if not_fp32:
            hint = {
                "plugin": "its formats need FP16 there and FP32 elsewhere, and the fp16 pass sets a custom op's "
                          "precision as a whole: use `qdq --high-precision fp16` with a per-input --plugin-precision",
                "rule": "leave the node out of the exclusion rules",
                "range": "raise --data-max",
                "initializer": "a constant it takes is beyond FP16's range (the pass option init_max), and the "
                               "plugin cannot take it in FP32",
            }[why[node.name]]
            raise UserError(f"fp16: custom node {node.name} would stay FP32 ({why[node.name]}), but its TensorRT "
                            f"formats give {', '.join(not_fp32)} no fp32: {hint}")
        out[node.name] = dict(want)
    return out


def _check_kept(model: onnx.ModelProto, types: dict[str, int], keep: set[str], large: set[str],
                io: set[str]) -> None:
    """AutoCast did what it was told: no node kept FP32 computes FP16, and no tensor of ``large`` (measured past
    data_max, or a constant beyond FP16) is FP16; the model inputs and outputs of ``io`` are FP16 by request and
    not judged. Raises a RuntimeError naming the first offenders."""
    fp16 = onnx.TensorProto.FLOAT16
    nodes = [n.name for n in model.graph.node
             if n.name in keep and any(types.get(t) == fp16 for t in n.output if t not in io)]
    tensors = sorted(t for t in large - io if types.get(t) == fp16)
    if nodes or tensors:
        raise RuntimeError("AutoCast typed FP16 what qdqkit kept FP32: "
                           + "; ".join(filter(None, (f"nodes {', '.join(nodes[:5])}" if nodes else "",
                                                     f"tensors {', '.join(tensors[:5])}" if tensors else ""))))


def _autocast(model: onnx.ModelProto, keep: set[str], beyond: set[str], init_max: float, keep_io_types: bool,
              ctx: PassContext) -> onnx.ModelProto:
    """ModelOpt AutoCast on a private copy: every node FP16 except the nodes named in ``keep``, those with an
    input or output in ``beyond`` and those with an initializer past ``init_max`` (AutoCast's own rule).

    AutoCast first cleans the graph up (it fuses a decomposed LayerNorm into one node, duplicates shared
    constants), so the range rule is applied by tensor name, which survives that, not by node name."""
    from qdqkit import modelopt_compat

    if modelopt_compat.modelopt_version() is None:
        raise UserError("the fp16 pass needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]'")
    with modelopt_call(model, ctx.custom_ops, ctx.workdir) as (src, _, _):
        from modelopt.onnx.autocast import convert_to_mixed_precision
        from modelopt.onnx.autocast.nodeclassifier import NodeRuleBase

        class KeptInFp32(NodeRuleBase):
            """The nodes qdqkit decided to keep (rules, ranges, initializers, plugin formats)."""

            def _check_inner(self, node: Any) -> bool:
                return node.name in keep or any(t in beyond for t in list(node.input) + list(node.output))

        # data_max=inf: the range decisions are qdqkit's (KeptInFp32), so AutoCast's own reference run (random
        # inputs without data, TensorRT's provider for custom ops) is skipped
        return convert_to_mixed_precision(
            onnx_path=str(src), low_precision_type="fp16", data_max=np.inf, init_max=init_max,
            keep_io_types=keep_io_types, custom_rule=KeptInFp32(), providers=["cpu"],
            opset=max(_MIN_OPSET, default_opset(model)),
        )
