"""Numeric comparison of a float model and its quantized version, on held-out samples, in onnxruntime (CPU).

Both models run with the registered custom-op CPU kernels. The quantized model runs as an *evaluation copy*
(the model that is written out is never changed), corrected for what the CPU runtime does differently from
TensorRT; each correction applied is listed in the result's ``notes``:
  1. onnxruntime 1.24's CPU QuantizeLinear truncates float16 inputs toward zero instead of rounding (fixed
     upstream later; TensorRT rounds): a Cast to float32 goes before every float16 QuantizeLinear (input and
     scale).
  2. A plugin that consumes INT8 (a QuantizeLinear feeds it directly) or produces INT8 (a DequantizeLinear reads
     its output) cannot run on a float CPU kernel: the copy dequantizes before it / quantizes after it with the
     same scale (the arithmetic the plugin performs internally) and runs that node's kernel in float32.
Sessions use basic graph optimizations only: onnxruntime's extended layer-norm fusion breaks on some fp16 Q/DQ
graphs (it references casts it inserted itself), and the numbers must not depend on CPU-only fusions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from qdqkit.calib import CalibrationSource, require
from qdqkit.coverage import QDQ_OPS
from qdqkit.errors import UserError
from qdqkit.model import elem_types, inferred_structure


@dataclass
class OutputStat:
    """Figures for one model output over the compared samples."""

    name: str
    cosine_min: float
    cosine_mean: float
    snr_db: float
    max_abs: float
    passed: bool


@dataclass
class ValidationResult:
    """Per-output figures, thresholds, and whether every output met them."""

    outputs: list[OutputStat]
    samples: tuple[int, int]
    min_cosine: float
    min_snr_db: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": {"start": self.samples[0], "count": self.samples[1]},
            "min_cosine": self.min_cosine,
            "min_snr_db": self.min_snr_db,
            "outputs": [o.__dict__ for o in self.outputs],
            "notes": self.notes,
        }

    def table(self) -> str:
        snr = "" if self.min_snr_db is None else f", SNR >= {self.min_snr_db} dB"
        head = (f"validation on samples [{self.samples[0]}, {sum(self.samples)}) (held out), threshold: "
                f"cosine >= {self.min_cosine} on the worst sample{snr}")
        rows = [f"{'output':<24} {'cos(min)':>9} {'cos(mean)':>9} {'SNR dB':>8} {'max|err|':>10}  ok"]
        for o in self.outputs:
            rows.append(f"{o.name:<24} {o.cosine_min:>9.5f} {o.cosine_mean:>9.5f} {o.snr_db:>8.2f} {o.max_abs:>10.4g}"
                        f"  {'yes' if o.passed else 'NO'}")
        return "\n".join([head, *rows, *(f"note: {n}" for n in self.notes)])

    def __str__(self) -> str:
        return self.table()


def evaluation_copy(model: onnx.ModelProto, registry: Any = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of a Q/DQ model corrected for CPU evaluation (module docstring, cases 1 and 2), with notes; a model
    without Q/DQ (an fp16 pass's) needs neither correction and is returned as it is."""
    if not any(n.op_type in QDQ_OPS for n in model.graph.node):
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    notes: list[str] = []
    g = m.graph
    types = _elem_types(m)
    new_nodes: list[onnx.NodeProto] = []
    fixed_fp16 = 0
    for n in g.node:
        if n.op_type == "QuantizeLinear" and types.get(n.input[0]) == TensorProto.FLOAT16:
            for i in (0, 1):
                cast_out = f"{n.input[i]}__qdqkit_eval_f32_{n.name}"
                new_nodes.append(helper.make_node("Cast", [n.input[i]], [cast_out], to=TensorProto.FLOAT,
                                                  name=f"{n.name}__qdqkit_eval_cast{i}"))
                n.input[i] = cast_out
            fixed_fp16 += 1
        new_nodes.append(n)
    if fixed_fp16:
        notes.append(f"{fixed_fp16} float16 QuantizeLinear evaluated in float32 (onnxruntime 1.24 CPU truncates "
                     "float16 instead of rounding; TensorRT rounds)")
    del g.node[:]
    g.node.extend(new_nodes)
    if registry is not None:
        fixed_plugins = _dequantize_plugin_int8_io(m, registry, types)  # the Casts added above carry no INT8
        if fixed_plugins:
            notes.append(f"INT8 plugin inputs/outputs evaluated through float kernels with the same scales: "
                         f"{', '.join(fixed_plugins)}")
    return m, notes


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = inferred_structure(model)  # without the bytes of heavy weights (past 2 GB onnx cannot)
    except Exception:  # noqa: BLE001 - the model's own declared types then
        inferred = model
    return elem_types(inferred.graph)


def _dequantize_plugin_int8_io(m: onnx.ModelProto, registry: Any, types: dict[str, int]) -> list[str]:
    """Rewrite, in the evaluation copy, each custom node with INT8 I/O to run in float32 between DQ and Q
    (``types``: the element types of its tensors)."""
    g = m.graph
    producer = {t: n for n in g.node for t in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    fixed: list[str] = []
    out_nodes: list[onnx.NodeProto] = []
    for n in g.node:
        spec = registry.lookup(n.domain, n.op_type)
        int8_in = [i for i, t in enumerate(n.input) if (p := producer.get(t)) is not None and p.op_type == "QuantizeLinear"]
        int8_out = [j for j, t in enumerate(n.output)
                    if consumers.get(t) and all(u.op_type == "DequantizeLinear" for u in consumers[t])]
        if spec is None or not (int8_in or int8_out):
            out_nodes.append(n)
            continue
        tag = f"__qdqkit_eval_{n.name}"
        for i, t in enumerate(n.input):
            if i in int8_in:
                q = producer[t]
                deq = f"{t}{tag}_dq"
                out_nodes.append(helper.make_node("DequantizeLinear", [t, *q.input[1:3]], [deq], name=f"{deq}_node"))
                t_float = deq
            elif types.get(t) == TensorProto.FLOAT16:
                t_float = t
            else:
                continue
            f32 = f"{t}{tag}_f32_{i}"
            out_nodes.append(helper.make_node("Cast", [t_float], [f32], to=TensorProto.FLOAT, name=f"{f32}_node"))
            n.input[i] = f32
            if i in int8_in:
                fixed.append(f"{n.name}:in{i}")
        out_nodes.append(n)
        for j, t in enumerate(n.output):
            raw = f"{t}{tag}_raw{j}"
            n.output[j] = raw
            if j in int8_out:
                dq = consumers[t][0]
                scale = f"{dq.input[1]}{tag}_f32"
                out_nodes.append(helper.make_node("Cast", [dq.input[1]], [scale], to=TensorProto.FLOAT,
                                                  name=f"{scale}_node"))
                out_nodes.append(helper.make_node("QuantizeLinear", [raw, scale, *dq.input[2:3]], [t],
                                                  name=f"{raw}_q"))
                fixed.append(f"{n.name}:out{j}")
            else:
                to = types.get(t, TensorProto.FLOAT) or TensorProto.FLOAT
                out_nodes.append(helper.make_node("Cast", [raw], [t], to=to, name=f"{raw}_cast"))
    # plugin outputs that now pass through a Q have stale float value_info: let inference redo them
    int8_tensors = {t for n in out_nodes if n.op_type == "QuantizeLinear" for t in n.output}
    for vi in list(g.value_info):
        if vi.name in int8_tensors:
            g.value_info.remove(vi)
    del g.node[:]
    g.node.extend(out_nodes)
    return fixed


def cosine(x: Any, y: Any) -> float:
    """Cosine similarity of two arrays in float64: 1.0 when both are zero, 0.0 when only one is."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    nx_, ny_ = np.linalg.norm(x), np.linalg.norm(y)
    return float(x @ y / (nx_ * ny_)) if nx_ > 0 and ny_ > 0 else float(nx_ == ny_)


def evaluation_session(model: onnx.ModelProto, registry: Any) -> Any:
    """The onnxruntime CPU session ``compare`` runs a model in (basic graph optimizations, see the module
    docstring); give it ``evaluation_copy`` of a Q/DQ model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    if registry is not None:
        return registry.session(model, sess_options=so)
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


_FLOAT_FEEDS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _float_feeds(session: Any) -> dict[str, Any]:
    """Each input of a session, with the float dtype it takes (None for other types)."""
    return {i.name: _FLOAT_FEEDS.get(i.type) for i in session.get_inputs()}


def _feed(sample: dict, inputs: dict[str, Any]) -> dict:
    """The sample's arrays for a session's inputs; a float array goes in as the float type the input takes (a model
    typed with FP16 inputs gets the samples rounded to FP16, as its users would feed it)."""
    out = {}
    for k, v in sample.items():
        if k in inputs:
            want = inputs[k]
            out[k] = v.astype(want) if want is not None and v.dtype.kind == "f" and v.dtype != want else v
    return out


def compare(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    source: CalibrationSource,
    registry: Any,
    start: int,
    count: int,
    min_cosine: float = 0.99,
    min_snr_db: float | None = None,
) -> ValidationResult:
    """Run both models on samples ``[start, start + count)`` of ``source`` and compare every output.

    Cosine similarity is computed per sample and the worst sample is held against ``min_cosine``; SNR (dB) is
    signal power over error power across all samples; max abs error across all samples.
    """
    require(source, start, count, "validation")
    quant_eval, notes = evaluation_copy(quant_model, registry)
    s_float = evaluation_session(float_model, registry)
    s_quant = evaluation_session(quant_eval, registry)
    names = [o.name for o in s_float.get_outputs()]
    qnames = {o.name for o in s_quant.get_outputs()}
    missing = [n for n in names if n not in qnames]
    if missing:
        raise UserError(f"the quantized model lacks output(s) {', '.join(missing)} of the float model; compare a "
                        "model with its own quantized version")
    in_float = _float_feeds(s_float)
    in_quant = _float_feeds(s_quant)
    cos: dict[str, list[float]] = {n: [] for n in names}
    sig = dict.fromkeys(names, 0.0)
    err = dict.fromkeys(names, 0.0)
    mx = dict.fromkeys(names, 0.0)
    for i in range(start, start + count):
        sample = source.sample(i)
        a = s_float.run(names, _feed(sample, in_float))
        b = s_quant.run(names, _feed(sample, in_quant))
        for n, x, y in zip(names, a, b):
            x = np.asarray(x, np.float64).ravel()
            y = np.asarray(y, np.float64).ravel()
            d = x - y
            cos[n].append(cosine(x, y))
            sig[n] += float(x @ x)
            err[n] += float(d @ d)
            mx[n] = max(mx[n], float(np.abs(d).max(initial=0.0)))
    stats = []
    for n in names:
        snr = float("inf") if err[n] == 0 else 10 * np.log10(max(sig[n], 1e-300) / err[n])
        ok = min(cos[n]) >= min_cosine and (min_snr_db is None or snr >= min_snr_db)
        if not np.isfinite(min(cos[n])):
            ok = False
        stats.append(OutputStat(n, min(cos[n]), float(np.mean(cos[n])), float(snr), mx[n], bool(ok)))
    return ValidationResult(stats, (start, count), min_cosine, min_snr_db, notes)
