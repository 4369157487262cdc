"""What the precision passes (``qdq``, ``fp16``) share: the model as TensorRT would describe it to ModelOpt, the
custom ops' precision check, and the value ranges of every float tensor measured in onnxruntime.

Both passes work on a private copy whose custom ops sit in ``trt.plugins`` with typed, shaped outputs (what
TensorRT would tell ModelOpt), run the model on the CPU through the registered kernels, and check afterwards
that every custom node receives the precision it was planned to get.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from qdqkit.calib import CalibrationSource, require
from qdqkit.coverage import QDQ_OPS
from qdqkit.customops import TRT_PLUGIN_DOMAIN, iter_graphs
from qdqkit.errors import UserError
from qdqkit.model import adopt_inferred, elem_types, inferred_structure

ONNX_PRECISION = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.INT8: "int8"}
FLOAT_ELEM_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a name (``<op_type>_<index>``): rules and reports refer to nodes by name.
    Returns how many were named."""
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


def check_runnable(model: onnx.ModelProto, registry: Any, purpose: str = "calibration runs the model",
                   kernels: bool = True) -> None:
    """The model is about to run in onnxruntime: every custom op needs a CPU implementation (unless ``kernels`` is
    false), every op a schema or a spec. ``purpose`` completes the error messages."""
    no_kernel = sorted({n.op_type for n, s in registry.custom_nodes(model)
                        if s.function is None and s.python_kernel is None}) if kernels else []
    if no_kernel:
        raise UserError(
            f"custom op(s) {', '.join(no_kernel)} have no CPU implementation, and {purpose} in "
            "onnxruntime: give their CustomOpSpec a `function` or a `python_kernel`"
        )
    unknown = sorted({n.op_type for n in model.graph.node
                      if not onnx.defs.has(n.op_type, n.domain if n.domain != "ai.onnx" else "")
                      and registry.lookup(n.domain, n.op_type) is None
                      and n.domain not in ("com.microsoft",)})
    if unknown:
        raise UserError(
            f"op(s) {', '.join(unknown)} are neither standard ONNX nor a registered custom op, and {purpose}: "
            "install the plugin that describes them (see `qdqkit ops`)"
        )


def as_trt_would_see_it(model: onnx.ModelProto, registry: Any, before: str = "quantization") -> tuple[
        onnx.ModelProto, dict[str, str]]:
    """Custom ops moved to ``trt.plugins`` with their outputs typed and shaped; returns the copy and the original
    domains (node name -> domain) of the nodes it moved. ``before`` names the step in error messages."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    domains: dict[str, str] = {}
    for node, _ in list(registry.custom_nodes(work)):
        if node.domain != TRT_PLUGIN_DOMAIN:
            domains[node.name] = node.domain
            node.domain = TRT_PLUGIN_DOMAIN
    if domains and not any(o.domain == TRT_PLUGIN_DOMAIN for o in work.opset_import):
        work.opset_import.append(helper.make_opsetid(TRT_PLUGIN_DOMAIN, 1))
    try:
        inferred = inferred_structure(work)
    except Exception as exc:  # onnx raises several kinds (inference, checker, type errors): one line each way
        raise UserError(f"shape inference failed before {before}: {str(exc).splitlines()[0]}") from None
    adopt_inferred(work, inferred)
    typed = {vi.name for vi in work.graph.value_info} | {vi.name for vi in work.graph.output}
    untyped = [t for n, _ in registry.custom_nodes(work) for t in n.output if t and t not in typed]
    if untyped:
        raise UserError(
            f"the outputs {', '.join(untyped)} of custom ops get no type from their specs' shape functions; "
            f"{before} would silently leave everything downstream untouched. Fix the spec's `infer`"
        )
    return work, domains


def restore_domains(model: onnx.ModelProto, domains: dict[str, str]) -> None:
    """Put back the domains ``as_trt_would_see_it`` moved (by node name; in place)."""
    for node in model.graph.node:
        if node.name in domains:
            node.domain = domains[node.name]


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor of the model's main graph as its ops derive it (ONNX shape inference with
    the declared ``value_info`` dropped: a custom op's output type is what its spec's shape function gives for the
    inputs it gets, not what a tool wrote down)."""
    return elem_types(inferred_structure(model, fresh=True).graph)


def computed_types(model: onnx.ModelProto, types: dict[str, int] | None = None) -> dict[str, int]:
    """How many tensors the main graph's nodes compute, by element type ("float", "float16", ...; "untyped" where
    none is known), Casts and Q/DQ aside: for a strongly typed TensorRT build, what runs in which precision. By the
    types given (``tensor_types``), or else as the model declares them (``elem_types``)."""
    if types is None:
        types = elem_types(model.graph)
    counts = Counter(TensorProto.DataType.Name(types[t]).lower() if types.get(t) else "untyped"
                     for n in model.graph.node if n.op_type not in ("Cast", *QDQ_OPS)
                     for t in n.output if t)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_plugin_precision(model: onnx.ModelProto, registry: Any, plan: dict[str, dict[str, str]],
                           by_node: dict[str, dict[str, str]] | None = None,
                           types: dict[str, int] | None = None) -> dict:
    """For every custom node, the precision each float input actually gets and each float output planned fp32 or
    fp16 carries, against the plan (per op type, or per node name in ``by_node``, which wins). ``types``: the
    model's ``tensor_types`` where the caller has them.

    An input planned int8 must be fed by a QuantizeLinear; fp16/fp32 must arrive as that ONNX type. Raises a
    RuntimeError listing the mismatches (the back end did not do what it was told).
    """
    types = types if types is not None else tensor_types(model)
    producer = {t: n for n in model.graph.node for t in n.output}
    found: dict[str, dict[str, str]] = {}
    wrong: list[str] = []
    for node, spec in registry.custom_nodes(model):
        want = (by_node or {}).get(node.name) or plan.get(node.op_type, {})
        got: dict[str, str] = {}
        for io, t in zip(spec.inputs, node.input):
            if io.name not in want or want[io.name] not in ("fp32", "fp16", "int8"):
                continue
            p = producer.get(t)
            actual = "int8" if p is not None and p.op_type == "QuantizeLinear" else ONNX_PRECISION.get(types.get(t), "?")
            got[io.name] = actual
            if actual != want[io.name]:
                wrong.append(f"{node.name}.{io.name}: planned {want[io.name]}, got {actual}")
        for io, t in zip(spec.outputs, node.output):  # a float output must carry its planned type too
            if t and want.get(io.name) in ("fp32", "fp16"):
                actual = ONNX_PRECISION.get(types.get(t), "?")
                got[io.name] = actual
                if actual != want[io.name]:
                    wrong.append(f"{node.name}.{io.name} (output): planned {want[io.name]}, got {actual}")
        found[node.name] = got
    if wrong:
        raise RuntimeError("plugin precision not applied: " + "; ".join(wrong))
    return found


# -- value ranges -----------------------------------------------------------------------------------------------

def _names(graph: onnx.GraphProto) -> set[str]:
    """Every node and tensor name of ``graph``, its bodies' included (one name scope in ONNX)."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        names |= {t.name for t in g.initializer} | {v.name for v in (*g.input, *g.output, *g.value_info)}
        for n in g.node:
            names.add(n.name)
            names.update(n.input)
            names.update(n.output)
    return names


def _free_prefix(graph: onnx.GraphProto, base: str) -> str:
    """``base``, with underscores added until no name of ``graph`` (bodies included) starts with it, so that the
    names built on it cannot meet the model's own."""
    names = _names(graph)
    prefix = base
    while any(n.startswith(prefix) for n in names):
        prefix += "_"
    return prefix


def float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """The floating-point tensors the model's main graph computes or takes as input (not initializers), in
    graph order, with their element types, from the model's own types (run shape inference first)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    types = elem_types(g)
    names = [i.name for i in g.input if i.name not in inits]
    names += [t for n in g.node if n.op_type != "Constant" for t in n.output if t]
    return {t: types[t] for t in dict.fromkeys(names) if types.get(t) in FLOAT_ELEM_TYPES}


def ranges_model(model: onnx.ModelProto, tensors: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose only output is one float32 vector: the minimum and the maximum of each of
    ``tensors`` (``float_tensors``: name -> element type, in graph order), interleaved (min 0, max 0, min 1, ...);
    a tensor that is not float32 is cast to it first (onnxruntime's CPU reductions do not all take float16). The
    added names start with
    ``qdqkit_ranges`` (with underscores appended where the model already has names starting so).

    The order of the added nodes matters for memory. onnxruntime's default execution order is a depth-first walk
    back from the outputs that takes a node's inputs by descending node index, and a node's index is its place in
    the node list. The reductions of the last tensor therefore come first in the list and those of the first
    tensor last: the walk then reaches the first tensor's reductions first, and every tensor is reduced right after
    it is made and can be released. Listed the other way round (each tensor's reductions after its producer), the
    walk computed the whole model before the first reduction: BEVFormer-tiny's range run peaked at 13.7 GB against
    2.4 GB as listed here and 1.8 GB for a plain run (``benchmarks/fp16_ranges.py``).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.output[:]
    pre = _free_prefix(g, "qdqkit_ranges")
    one = f"{pre}_shape"
    g.initializer.append(helper.make_tensor(one, TensorProto.INT64, [1], [1]))
    extremes = [f"{pre}/{i}/{kind}/1" for i in range(len(tensors)) for kind in ("min", "max")]
    chains = []
    for i, (t, elem_type) in enumerate(tensors.items()):
        chain = []
        src = t
        if elem_type != TensorProto.FLOAT:
            src = f"{pre}/{i}/f32"
            chain.append(helper.make_node("Cast", [t], [src], to=TensorProto.FLOAT, name=f"{pre}/{i}/cast"))
        for kind in ("Min", "Max"):
            r = f"{pre}/{i}/{kind.lower()}"
            chain.append(helper.make_node(f"Reduce{kind}", [src], [r], name=f"{r}/reduce", keepdims=0))
            chain.append(helper.make_node("Reshape", [r, one], [f"{r}/1"], name=f"{r}/reshape"))
        chains.append(chain)
    for chain in reversed(chains):
        g.node.extend(chain)
    g.node.append(helper.make_node("Concat", extremes, [pre], axis=0, name=f"{pre}/concat"))
    g.output.append(helper.make_tensor_value_info(pre, TensorProto.FLOAT, [2 * len(tensors)]))
    return out


def tensor_ranges(model: onnx.ModelProto, registry: Any, source: CalibrationSource, start: int, count: int,
                  tensors: dict[str, int] | None = None) -> dict[str, tuple[float, float]]:
    """The minimum and maximum of every float tensor (or of ``tensors``, as ``float_tensors`` gives them) over
    samples ``[start, start + count)``,
    computed in onnxruntime on the CPU with the registered custom-op kernels, one sample at a time: only two
    numbers a tensor leave the session, so memory does not grow with the model's activations. A tensor that is
    empty on every sample gets (inf, -inf); infinities count as extremes. NaN does not reliably show: onnxruntime's
    ReduceMin/ReduceMax skip a NaN unless it comes first."""
    import onnxruntime as ort

    require(source, start, count, "range measurement")
    if tensors is None:
        tensors = float_tensors(inferred_structure(model))
    if not tensors:
        return {}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = registry.session(ranges_model(model, tensors), sess_options=so)
    feeds = {i.name for i in session.get_inputs()}
    output = session.get_outputs()[0].name
    lo = np.full(len(tensors), np.inf, dtype=np.float32)
    hi = np.full(len(tensors), -np.inf, dtype=np.float32)
    for i in range(start, start + count):
        sample = source.sample(i)
        both = session.run([output], {k: v for k, v in sample.items() if k in feeds})[0]
        a, b = both[0::2], both[1::2]
        # minimum/maximum, not fmin/fmax: a NaN extreme onnxruntime does return is kept
        lo = np.minimum(lo, a)
        hi = np.maximum(hi, b)
    return {t: (float(x), float(y)) for t, x, y in zip(tensors, lo, hi)}
