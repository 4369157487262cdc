"""The ``qdq`` pass: INT8 Q/DQ insertion, calibrated on the CPU through the registered custom-op kernels."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from qdqkit.calib import SampleReader, model_inputs, require, resolve_source
from qdqkit.coverage import COMPUTE_OPS, qdq_summary
from qdqkit.customops import TRT_PLUGIN_DOMAIN
from qdqkit.errors import UserError
from qdqkit.pass_infra import Pass, PassContext, PassResult
from qdqkit.quant_backends import QuantJob, plugin_precision_plan
from qdqkit.rules import ExclusionRules

STATE_KEY = "qdq"
_ONNX_PRECISION = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.INT8: "int8"}


@dataclass
class QdqOptions:
    """Options of the ``qdq`` pass (CLI flags and TOML keys of the same names map onto these).

    ``exclude_nodes`` are regexes matched against the FULL node name; ``exclude_nodes_glob`` shell globs;
    ``exclude_between`` pairs of tensor names; ``optional_rules`` labels (``pattern:mha``) or values of rules
    allowed to match nothing. ``plugin_precision`` maps a custom op type to "fp16" or "name=prec,...,*=prec".
    """

    exclude_op_types: list[str] = field(default_factory=list)
    exclude_nodes: list[str] = field(default_factory=list)
    exclude_nodes_glob: list[str] = field(default_factory=list)
    exclude_between: list[list[str]] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)
    optional_rules: list[str] = field(default_factory=list)
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
    provides = frozenset({"quantized"})
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
        renamed = _name_nodes(proto)
        _check_runnable(proto, registry)

        rules = ExclusionRules.from_options(
            op_types=o.exclude_op_types, nodes=o.exclude_nodes, nodes_glob=o.exclude_nodes_glob,
            between=o.exclude_between, patterns=o.exclude_patterns, optional=o.optional_rules,
        )
        resolution = rules.resolve(proto, ctx.registries.get("rules"))

        inputs = model_inputs(proto)
        source = resolve_source(ctx.calib_spec, inputs, ctx.hook)
        require(source, 0, o.calib_samples, "calibration")
        flags, plan = plugin_precision_plan(proto, registry, o.high_precision, o.plugin_precision)

        work, domains = _as_trt_would_see_it(proto, registry)
        job = QuantJob(
            reader=SampleReader(source, 0, o.calib_samples), custom_ops=registry,
            nodes_to_exclude=resolution.excluded, calibration_method=o.calibration_method,
            high_precision=o.high_precision, plugin_flags=flags, workdir=ctx.workdir,
        )
        ctx.say(f"qdq: calibrating with {o.backend} on {o.calib_samples} samples of {source.describe()}")
        t0 = time.perf_counter()
        quant = backend.quantize(work, job)
        seconds = time.perf_counter() - t0

        for node in quant.graph.node:
            if node.name in domains:
                node.domain = domains[node.name]
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


def _name_nodes(model: onnx.ModelProto) -> int:
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
            count += 1
    return count


def _check_runnable(model: onnx.ModelProto, registry: Any) -> None:
    """Calibration runs the model: every custom op needs a CPU implementation, every op a schema or a spec."""
    no_kernel = sorted({n.op_type for n, s in registry.custom_nodes(model)
                        if s.function is None and s.python_kernel is None})
    if no_kernel:
        raise UserError(
            f"custom op(s) {', '.join(no_kernel)} have no CPU implementation, and calibration runs the model in "
            "onnxruntime: give their CustomOpSpec a `function` or a `python_kernel`"
        )
    unknown = sorted({n.op_type for n in model.graph.node
                      if not onnx.defs.has(n.op_type, n.domain if n.domain != "ai.onnx" else "")
                      and registry.lookup(n.domain, n.op_type) is None
                      and n.domain not in ("com.microsoft",)})
    if unknown:
        raise UserError(
            f"op(s) {', '.join(unknown)} are neither standard ONNX nor a registered custom op, and calibration must "
            "run them: install the plugin that describes them (see `qdqkit ops`)"
        )


def _as_trt_would_see_it(model: onnx.ModelProto, registry: Any) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Custom ops moved to ``trt.plugins`` with their outputs typed and shaped; returns the original domains."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    domains: dict[str, str] = {}
    for node, _ in list(registry.custom_nodes(work)):
        if node.domain != TRT_PLUGIN_DOMAIN:
            domains[node.name] = node.domain
            node.domain = TRT_PLUGIN_DOMAIN
    if domains and not any(o.domain == TRT_PLUGIN_DOMAIN for o in work.opset_import):
        work.opset_import.append(onnx.helper.make_opsetid(TRT_PLUGIN_DOMAIN, 1))
    try:
        work = onnx.shape_inference.infer_shapes(work)
    except Exception as exc:
        raise UserError(f"shape inference failed before quantization: {str(exc).splitlines()[0]}") from None
    typed = {vi.name for vi in work.graph.value_info} | {vi.name for vi in work.graph.output}
    untyped = [t for n, _ in registry.custom_nodes(work) for t in n.output if t and t not in typed]
    if untyped:
        raise UserError(
            f"the outputs {', '.join(untyped)} of custom ops get no type from their specs' shape functions; the "
            "back end would silently leave everything downstream unquantized. Fix the spec's `infer`"
        )
    return work, domains


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


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def check_plugin_precision(model: onnx.ModelProto, registry: Any, plan: dict[str, dict[str, str]]) -> dict:
    """For every custom node, the precision each float input actually gets, against the plan.

    An input planned int8 must be fed by a QuantizeLinear; fp16/fp32 must arrive as that ONNX type. Raises a
    RuntimeError listing the mismatches (the back end did not do what it was told).
    """
    types = _types(model)
    producer = {t: n for n in model.graph.node for t in n.output}
    found: dict[str, dict[str, str]] = {}
    wrong: list[str] = []
    for node, spec in registry.custom_nodes(model):
        want = plan.get(node.op_type, {})
        got: dict[str, str] = {}
        for io, t in zip(spec.inputs, node.input):
            if io.name not in want or want[io.name] not in ("fp32", "fp16", "int8"):
                continue
            p = producer.get(t)
            actual = "int8" if p is not None and p.op_type == "QuantizeLinear" else _ONNX_PRECISION.get(types.get(t), "?")
            got[io.name] = actual
            if actual != want[io.name]:
                wrong.append(f"{node.name}.{io.name}: planned {want[io.name]}, got {actual}")
        found[node.name] = got
    if wrong:
        raise RuntimeError("plugin precision not applied: " + "; ".join(wrong))
    return found


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
