"""The ``qdq`` pass: INT8 Q/DQ insertion, calibrated on the CPU through the registered custom-op kernels."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from qdqkit.calib import SampleReader, model_inputs, require, resolve_source
from qdqkit.coverage import COMPUTE_OPS, qdq_summary
from qdqkit.errors import UserError
from qdqkit.pass_infra import Pass, PassContext, PassResult
from qdqkit.precision import (
    as_trt_would_see_it,
    check_plugin_precision,
    check_runnable,
    name_nodes,
    restore_domains,
)
from qdqkit.quant_backends import QuantJob, plugin_precision_plan
from qdqkit.rules import ExclusionRules, RuleOptions

STATE_KEY = "qdq"


@dataclass
class QdqOptions(RuleOptions):
    """Options of the ``qdq`` pass (CLI flags and TOML keys of the same names map onto these).

    ``exclude_nodes`` are regexes matched against the FULL node name; ``exclude_nodes_glob`` shell globs;
    ``exclude_between`` pairs of tensor names; ``optional_rules`` labels (``pattern:mha``) or values of rules
    allowed to match nothing. ``plugin_precision`` maps a custom op type to "fp16" or "name=prec,...,*=prec".
    """

    calibration_method: str = "max"
    calib_samples: int = 16
    high_precision: str = "fp32"
    plugin_precision: dict[str, str] = field(default_factory=dict)
    backend: str = "modelopt"


class QdqPass(Pass):
    """Insert INT8 QuantizeLinear/DequantizeLinear pairs with a quantization back end (ModelOpt by default).

    1. Calibration data comes from ``ctx.calib_spec`` (plugins first, then the .npz / .npy-folder reader);
       samples ``[0, calib_samples)`` calibrate, later ones are left for ``validate``.
    2. Exclusion rules are resolved on the graph; a rule matching nothing stops the pass (unless optional);
       the stats list which rule excluded which nodes.
    3. The back end works on a private copy in which custom ops sit in ``trt.plugins`` with typed, shaped
       outputs (what TensorRT would tell ModelOpt); their original domains are restored afterwards.
    4. Custom ops get the precision planned from their TensorRT formats and ``plugin_precision``; the result is
       checked node by node, and so is every Conv/MatMul/Gemm downstream of a custom op (a weight quantized
       with an unquantized activation means the back end lost the tensor's type: an error, not a silent loss).
    5. ``high_precision`` fp16 types everything outside the INT8 regions as float16 (TensorRT 11 builds are
       strongly typed); model inputs and outputs stay float32.
    Unnamed nodes get names (``<op_type>_<index>``), since rules and the report refer to nodes by name.
    """

    name = "qdq"
    summary = "INT8 Q/DQ insertion (ModelOpt by default) calibrated on the CPU through the custom-op kernels"
    requires = frozenset()
    provides = frozenset({"quantized", "reduced-precision"})
    Options = QdqOptions

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        o = self.options
        _check_options(o)
        backends = ctx.registries.get("quant_backends")
        if backends is None:
            raise UserError("no quantization back end is registered (the built-in plugin is disabled?)")
        backend = backends.get(o.backend)
        registry = ctx.custom_ops
        registry.register_onnx_schemas()

        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        renamed = name_nodes(proto)
        check_runnable(proto, registry)

        rules = ExclusionRules.from_rule_options(o)
        resolution = rules.resolve(proto, ctx.registries.get("rules"))

        inputs = model_inputs(proto)
        source = resolve_source(ctx.calib_spec, inputs, ctx.hook)
        require(source, 0, o.calib_samples, "calibration")
        flags, plan = plugin_precision_plan(proto, registry, o.high_precision, o.plugin_precision)

        work, domains = as_trt_would_see_it(proto, registry)
        job = QuantJob(
            reader=SampleReader(source, 0, o.calib_samples), custom_ops=registry,
            nodes_to_exclude=resolution.excluded, calibration_method=o.calibration_method,
            high_precision=o.high_precision, plugin_flags=flags, workdir=ctx.workdir,
        )
        ctx.say(f"qdq: calibrating with {o.backend} on {o.calib_samples} samples of {source.describe()}")
        t0 = time.perf_counter()
        quant = backend.quantize(work, job)
        seconds = time.perf_counter() - t0

        restore_domains(quant, domains)
        registry.strip_functions(quant)
        _retype_int8_plugin_outputs(quant, registry)
        plugin_check = check_plugin_precision(quant, registry, plan)
        downstream = check_downstream_of_custom_ops(quant, registry, set(resolution.excluded))
        if downstream["weight_only"]:
            raise RuntimeError(
                f"the {o.backend} back end quantized the weights but not the activations of "
                f"{', '.join(downstream['weight_only'])}: it lost the type of a tensor downstream of a custom op"
            )

        ctx.state[STATE_KEY] = {
            "float_model": proto, "source": source, "calib_samples": o.calib_samples, "plan": plan,
            "high_precision": o.high_precision,
        }
        model.set_proto(quant)
        summary = qdq_summary(quant, registry)
        stats = {
            "backend": o.backend,
            "calibration": {"source": source.describe(), "samples": o.calib_samples,
                            "method": o.calibration_method, "seconds": round(seconds, 3)},
            "high_precision": o.high_precision,
            "rules": resolution.to_dict(),
            "plugin_precision": plan,
            "plugin_precision_flags": flags,
            "plugin_check": plugin_check,
            "downstream_of_custom_ops": downstream,
            "named_nodes": renamed,
            "summary": summary,
            "notes": job.notes,
        }
        return PassResult(modified=True, stats=stats)


def _check_options(o: QdqOptions) -> None:
    if o.calibration_method not in ("max", "entropy"):
        raise UserError(f"calibration_method must be 'max' or 'entropy', got '{o.calibration_method}'")
    if o.high_precision not in ("fp32", "fp16"):
        raise UserError(
            f"high_precision must be 'fp32' or 'fp16', got '{o.high_precision}' (bf16 is refused: ModelOpt 0.47 "
            "crashes on bf16 with custom ops)" if o.high_precision == "bf16" else
            f"high_precision must be 'fp32' or 'fp16', got '{o.high_precision}'"
        )
    if not isinstance(o.calib_samples, int) or o.calib_samples < 1:
        raise UserError(f"calib_samples must be a positive integer, got {o.calib_samples!r}")


def _retype_int8_plugin_outputs(model: onnx.ModelProto, registry: Any) -> None:
    """A plugin output read only by DequantizeLinear is INT8 (the plugin quantizes it): say so in value_info.

    ModelOpt leaves the float type there, which the full checker rejects against the DequantizeLinear.
    """
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n.op_type)
    int8 = {t for n, _ in registry.custom_nodes(model) for t in n.output
            if readers.get(t) and all(r == "DequantizeLinear" for r in readers[t])}
    typed = set()
    for vi in model.graph.value_info:
        if vi.name in int8:
            vi.type.tensor_type.elem_type = onnx.TensorProto.INT8
            typed.add(vi.name)
    for t in sorted(int8 - typed):
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.INT8, None))


def check_downstream_of_custom_ops(model: onnx.ModelProto, registry: Any, excluded: set[str]) -> dict:
    """Conv/MatMul/Gemm nodes downstream of a custom op: INT8, excluded by a rule, or left by the back end.

    ``weight_only`` lists nodes whose weight has a DequantizeLinear but whose activation has none: the sign of
    a back end that could not type a tensor (ModelOpt does this silently without TensorRT).
    """
    producer = {t: n for n in model.graph.node for t in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    stack = [t for n, _ in registry.custom_nodes(model) for t in n.output]
    seen_nodes: set[str] = set()
    down: list[onnx.NodeProto] = []
    while stack:
        t = stack.pop()
        for c in consumers.get(t, []):
            if c.name in seen_nodes:
                continue
            seen_nodes.add(c.name)
            down.append(c)
            stack.extend(c.output)

    def dq(t: str) -> bool:
        p = producer.get(t)
        while p is not None and p.op_type == "Cast":
            p = producer.get(p.input[0])
        return p is not None and p.op_type == "DequantizeLinear"

    inits = {t.name for t in model.graph.initializer}

    def dq_weight(t: str) -> bool:
        """A DequantizeLinear of an initializer (directly, or of a QuantizeLinear of one)."""
        if not dq(t):
            return False
        p = producer.get(t)
        while p.op_type == "Cast":
            p = producer[p.input[0]]
        src = p.input[0]
        q = producer.get(src)
        return src in inits or (q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits)

    result: dict[str, list[str]] = {"int8": [], "excluded": [], "left_by_backend": [], "weight_only": []}
    for n in down:
        if n.op_type not in COMPUTE_OPS:
            continue
        act, wt = dq(n.input[0]), len(n.input) > 1 and dq(n.input[1])
        if act and wt:
            result["int8"].append(n.name)
        elif not act and n.name not in excluded and len(n.input) > 1 and dq_weight(n.input[1]):
            result["weight_only"].append(n.name)
        elif n.name in excluded:
            result["excluded"].append(n.name)
        else:
            result["left_by_backend"].append(n.name)
    return result
