"""Quantization back ends: the engine the ``qdq`` pass hands a model, its exclusions and its calibration data.

A back end is an object with ``name`` and ``quantize(model, job) -> onnx.ModelProto``. Two are built in and
registered by the built-in plugin through ``qdqkit_register_quant_backends``:
  1. ``modelopt`` (default): NVIDIA ModelOpt's TensorRT-oriented INT8 placement (``modelopt.onnx.quantization``).
  2. ``ort``: onnxruntime's ``quantize_static`` in QDQ format (per-channel weights, symmetric activations), to
     compare placements on a model. It has no FP16 conversion. ModelOpt patches onnxruntime's quantization
     classes for the rest of the process once it has run, so compare the two in separate processes.
Both run every onnxruntime session they create with the registered custom-op CPU kernels.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx

from qdqkit.calib import SampleReader
from qdqkit.errors import UserError
from qdqkit.model import TOOL_COPY_EXTERNAL_BYTES, proto_size, save_model

FLOAT_TYPES = {"tensor(float)": "fp32", "tensor(float16)": "fp16", "tensor(bfloat16)": "bf16"}
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class QuantJob:
    """What a back end needs besides the model."""

    reader: SampleReader
    custom_ops: Any                      # qdqkit.customops.CustomOpRegistry
    nodes_to_exclude: list[str] = field(default_factory=list)   # exact node names
    calibration_method: str = "max"
    high_precision: str = "fp32"
    plugin_flags: list[str] = field(default_factory=list)       # ModelOpt trt_plugins_precision strings
    workdir: Path | None = None
    notes: list[str] = field(default_factory=list)              # lines for the report


class QuantBackend(Protocol):
    name: str

    def quantize(self, model: onnx.ModelProto, job: QuantJob) -> onnx.ModelProto: ...


class QuantBackendRegistry:
    """Back ends by name, filled through ``qdqkit_register_quant_backends``."""

    def __init__(self) -> None:
        self._backends: dict[str, Any] = {}
        self.current_plugin = "?"

    def add(self, name: str, backend: Any) -> None:
        if name in self._backends and self._backends[name] is not backend:
            raise ValueError(f"quantization back end '{name}' registered twice (second by '{self.current_plugin}')")
        self._backends[name] = backend

    def add_builtins(self) -> None:
        self.add("modelopt", ModelOptBackend())
        self.add("ort", OrtBackend())

    def get(self, name: str) -> Any:
        try:
            return self._backends[name]
        except KeyError:
            raise UserError(
                f"unknown quantization back end '{name}'; known: {', '.join(sorted(self._backends)) or 'none'}"
            ) from None

    def __iter__(self):
        return iter(sorted(self._backends))

    def __contains__(self, name: object) -> bool:
        return name in self._backends


def _anchored(names: list[str]) -> list[str]:
    # ModelOpt treats nodes_to_exclude as regexes anchored at the start only: escape and anchor the end too.
    return [re.escape(n) + "$" for n in names]


class ModelOptBackend:
    """INT8 Q/DQ by ModelOpt, calibrated on the CPU with the custom-op kernels installed in its sessions."""

    name = "modelopt"

    def quantize(self, model: onnx.ModelProto, job: QuantJob) -> onnx.ModelProto:
        from qdqkit import modelopt_compat

        job.custom_ops.register_onnx_schemas()
        with modelopt_call(model, job.custom_ops, job.workdir) as (src, external, patch_notes):
            from modelopt.onnx.quantization import quantize

            out = src.with_name("model.quant.onnx")
            quantize(
                onnx_path=str(src),
                quantize_mode="int8",
                calibration_data_reader=job.reader,
                calibration_method=job.calibration_method,
                calibration_eps=["cpu"],
                nodes_to_exclude=_anchored(job.nodes_to_exclude),
                high_precision_dtype=job.high_precision,
                dq_only=False,
                simplify=False,
                trt_plugins_precision=job.plugin_flags or None,
                output_path=str(out),
                use_external_data_format=external,
                log_level="WARNING",
            )
            if not out.exists():
                raise RuntimeError("ModelOpt finished without writing its output model")
            result = onnx.load(str(out))
        job.notes.append(f"modelopt {modelopt_compat.modelopt_version()}: INT8, calibration on CPU")
        job.notes.extend(patch_notes.lines())
        return result


class OrtBackend:
    """INT8 Q/DQ by onnxruntime's ``quantize_static`` (QDQ format), for comparing placements."""

    name = "ort"

    def quantize(self, model: onnx.ModelProto, job: QuantJob) -> onnx.ModelProto:
        if job.high_precision != "fp32":
            raise UserError("the ort back end keeps non-INT8 parts in fp32 only; use --high-precision fp32 with it")
        if job.plugin_flags and any(":fp32" not in f for f in job.plugin_flags):
            job.notes.append("ort back end: plugin precision overrides are ignored (custom ops stay fp32)")
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from qdqkit import modelopt_compat

        method = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[job.calibration_method]
        with modelopt_compat.run_in_private_dir(job.workdir) as tmp:
            src, out = tmp / "model.onnx", tmp / "model.quant.onnx"
            # onnxruntime's quantizer infers shapes with onnx: give it a typed model so it does not skip tensors
            job.custom_ops.register_onnx_schemas()
            onnx.save(onnx.shape_inference.infer_shapes(model), str(src))
            custom = {n.op_type for n, _ in job.custom_ops.custom_nodes(model)}
            op_types = sorted({n.op_type for n in model.graph.node} - custom)
            with job.custom_ops.installed_in_onnxruntime(), quiet_logger("onnxruntime"):
                quantize_static(
                    str(src), str(out), job.reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=op_types,
                    per_channel=True,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(job.nodes_to_exclude),
                    calibrate_method=method,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                )
            result = onnx.load(str(out))
        job.notes.append("onnxruntime quantize_static: QDQ, per-channel INT8 weights, symmetric activations")
        return result


# ModelOpt messages that are expected on this path and would only alarm: the CPU has no NVML, and integer plugin
# inputs are named by their type in the precision flag (ModelOpt then leaves them alone, as intended).
_EXPECTED = ("Failed to get GPU count", "are not supported. Skipping those")
# AutoCast (ModelOpt's FP16 typing, also run by quantize for --high-precision fp16) warns of what it does to any
# model: shared constants duplicated, the opset raised to 19 for FP16 Q/DQ. Nothing to act on.
AUTOCAST_NOISE = ("Shared constants were detected", "Updating minimum opset")


@contextlib.contextmanager
def calibrator_prints_muted() -> Any:
    """onnxruntime's histogram calibrator prints a line per sample and a summary to stdout ("Collecting tensor data
    and making histogram ..."): inside the block its module's ``print`` is a no-op. Only that module's: replacing
    ``sys.stdout`` would silence everything else in the process too."""
    from onnxruntime.quantization import calibrate

    had = "print" in vars(calibrate)
    before = vars(calibrate).get("print")
    calibrate.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if had:
            calibrate.print = before  # type: ignore[attr-defined]
        else:
            del calibrate.print


@contextlib.contextmanager
def modelopt_call(model: onnx.ModelProto, registry: Any, workdir: Path | None) -> Any:
    """What every call into ModelOpt (INT8 quantization, AutoCast) needs around it: the patches of
    ``modelopt_compat``, a private working folder holding ``model`` saved as ``model.onnx`` (ModelOpt rewrites its
    input and drops files where it runs; external data past ``TOOL_COPY_EXTERNAL_BYTES``), the custom ops' CPU
    kernels in every onnxruntime session it makes, and ``modelopt_quiet``. Yields (the copy's path, whether it has
    external data, the patches' ``PatchNotes``)."""
    from qdqkit import modelopt_compat

    with modelopt_compat.patched_modelopt() as notes, modelopt_compat.run_in_private_dir(workdir) as tmp:
        src = tmp / "model.onnx"
        # proto_size sums the parts (ByteSize would serialize the whole model); save_model leaves ``model`` as it
        # is, where onnx.save with external data would move its weights out in place
        external = proto_size(model) > TOOL_COPY_EXTERNAL_BYTES
        save_model(model, src, external_data=external, durable=False)
        with registry.installed_in_onnxruntime(), modelopt_quiet():
            yield src, external, notes


@contextlib.contextmanager
def modelopt_quiet() -> Any:
    """What a call into ModelOpt (INT8 quantization, AutoCast) may say, brought down to what concerns the user, for
    both passes that make one: its loggers at WARNING (they log every step at INFO), the warnings that say nothing
    to act on muted (``_EXPECTED``, ``AUTOCAST_NOISE``, onnxscript's converter falling back to onnx's), and
    onnxruntime's calibrator prints. The warnings left reach the root logger only (ModelOpt's own handler is kept
    off by ``modelopt_compat``'s patch 10): the report has them, and the terminal unless the run is quiet."""
    with quiet_logger("modelopt"), quiet_logger("modelopt.onnx"), quiet_logger("modelopt.onnx.autocast"), \
            MutedMessages("modelopt.onnx", _EXPECTED), MutedMessages("modelopt.onnx.autocast", AUTOCAST_NOISE), \
            MutedMessages("onnxscript.version_converter", ("and fallback is enabled",)), calibrator_prints_muted():
        yield


class MutedMessages(logging.Filter):
    """Drop records containing any of ``texts`` from one logger for the duration of the block."""

    def __init__(self, name: str, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.logger, self.texts = logging.getLogger(name), texts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(t in msg for t in self.texts)

    def __enter__(self) -> None:
        self.logger.addFilter(self)

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeFilter(self)


class quiet_logger:
    """Lower a library's logger to WARNING for the block (ModelOpt logs every step at INFO)."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(max(self.level, logging.WARNING))

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


# -- plugin precision ---------------------------------------------------------------------------------------------

def float_io(io: Any) -> bool:
    """Whether a custom op's input or output (a spec's ``IOSpec``) takes a floating-point type."""
    return any(t in FLOAT_TYPES for t in io.types)


def plugin_precision_plan(
    model: onnx.ModelProto, registry: Any, high_precision: str, overrides: dict[str, str] | None = None
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Decide the precision of every custom op's inputs and outputs.

    Default: each float input/output in ``high_precision`` when the op's TensorRT formats allow it and its CPU
    implementation can run it (an ONNX ``function`` follows the input types; a ``python_kernel`` is registered
    for float32 only), else fp32 when allowed, else the first float format listed; integer inputs keep their
    type. ``overrides`` maps
    an op type to "fp16" (every float I/O), or to "name=prec,...,*=prec" per input/output name (``*`` = the
    rest). INT8 is never chosen by default: it must be asked for, and is checked against the formats.

    Returns the ModelOpt ``trt_plugins_precision`` flags and, per op type, the plan {io name: precision}.
    """
    overrides = dict(overrides or {})
    present: dict[str, Any] = {}
    for node, spec in registry.custom_nodes(model):
        present.setdefault(node.op_type, spec)
    unknown = sorted(set(overrides) - set(present))
    if unknown:
        raise UserError(
            f"plugin precision given for {', '.join(unknown)}, which is no custom op of this model "
            f"(it has: {', '.join(sorted(present)) or 'none'})"
        )
    flags: list[str] = []
    plan: dict[str, dict[str, str]] = {}
    for op_type, spec in sorted(present.items()):
        formats = dict(spec.trt.formats) if spec.trt is not None else {}
        asked = _parse_override(op_type, overrides.get(op_type), spec)
        ios = [("in", io) for io in spec.inputs] + [("out", io) for io in spec.outputs]
        chosen: dict[str, str] = {}
        for _, io in ios:
            allowed = tuple(formats.get(io.name, ()))
            if not float_io(io):
                chosen[io.name] = next((t.split("(")[1][:-1] for t in io.types), "int64")
                if io.name in asked:
                    raise UserError(f"plugin {op_type}: '{io.name}' is an integer input; its precision is fixed")
                continue
            want = asked.get(io.name, asked.get("*"))
            if want is None:
                floats = [p for p in allowed if p in ("fp32", "fp16")]
                cpu_ok = high_precision == "fp32" or spec.function is not None
                if cpu_ok and (not allowed or high_precision in allowed):
                    want = high_precision
                else:
                    want = "fp32" if (not allowed or "fp32" in allowed) else (floats[0] if floats else "fp32")
            elif allowed and want not in allowed:
                raise UserError(
                    f"plugin {op_type}: '{io.name}' does not accept {want} (its TensorRT formats: {', '.join(allowed)})"
                )
            chosen[io.name] = want
        plan[op_type] = chosen
        ins = ",".join(chosen[io.name] for io in spec.inputs)
        outs = ",".join(chosen[io.name] for io in spec.outputs)
        flags.append(f"{op_type}:[{ins}]:[{outs}]")
    return flags, plan


def _parse_override(op_type: str, text: str | None, spec: Any) -> dict[str, str]:
    if not text:
        return {}
    names = {io.name for io in (*spec.inputs, *spec.outputs)}
    text = text.strip()
    if "=" not in text:
        if text not in PRECISIONS:
            raise UserError(f"plugin precision for {op_type}: '{text}' is not one of {', '.join(PRECISIONS)}")
        return {"*": text}
    out: dict[str, str] = {}
    for part in text.split(","):
        name, _, prec = part.partition("=")
        name, prec = name.strip(), prec.strip()
        if name != "*" and name not in names:
            raise UserError(
                f"plugin precision for {op_type}: no input or output named '{name}' (it has: {', '.join(sorted(names))})"
            )
        if prec not in PRECISIONS:
            raise UserError(f"plugin precision for {op_type}: '{prec}' is not one of {', '.join(PRECISIONS)}")
        out[name] = prec
    return out
