"""The ``validate`` pass: the quantized (or FP16-typed) model against the float one, on held-out samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qdqkit.errors import UserError, ValidationFailed
from qdqkit.pass_infra import Pass, PassContext, PassResult
from qdqkit.validation import compare


@dataclass
class ValidateOptions:
    """``samples``: how many held-out samples (taken right after the calibration ones); thresholds per output."""

    samples: int = 8
    min_cosine: float = 0.99
    min_snr_db: float | None = None


class ValidatePass(Pass):
    """Compare every output of the quantized model with the float model in onnxruntime on the CPU.

    1. The float model and the calibration source are the ones the ``qdq`` pass (or the ``fp16`` pass) used; it
       must run first. Validation takes samples ``[calib_samples, calib_samples + samples)``, never a sample
       that calibrated or measured ranges.
    2. Per output: cosine similarity (worst sample), SNR in dB, max abs error; the figures go to the report.
    3. Below a threshold the pipeline stops with ``ValidationFailed`` (exit code 1) after recording the figures.
    4. The quantized model runs as an evaluation copy corrected for CPU-only runtime differences (see
       ``qdqkit.validation``); the corrections are listed in the report. The model itself is never changed.
    """

    name = "validate"
    summary = "cosine / SNR / max error of every output against the float model on held-out samples"
    requires = frozenset({"reduced-precision"})
    Options = ValidateOptions

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        o = self.options
        if not isinstance(o.samples, int) or o.samples < 1:
            raise UserError(f"validate: samples must be a positive integer, got {o.samples!r}")
        state = ctx.state.get("qdq") or ctx.state.get("fp16")
        if state is None:
            raise UserError("the validate pass needs the qdq or the fp16 pass earlier in the pipeline")
        if state["source"] is None:
            raise UserError("the validate pass needs samples: give --calib (the fp16 pass ran without data)")
        result = compare(state["float_model"], model.proto, state["source"], ctx.custom_ops,
                         start=state["calib_samples"], count=o.samples, min_cosine=o.min_cosine,
                         min_snr_db=o.min_snr_db)
        ctx.state["validate"] = result
        ctx.say(result.table())
        if not result.passed:
            worst = min(result.outputs, key=lambda s: s.cosine_min)
            raise ValidationFailed(
                f"validation failed: output '{worst.name}' cosine {worst.cosine_min:.4f} (threshold "
                f"{o.min_cosine}), SNR {worst.snr_db:.1f} dB; see the report",
                stats=result.to_dict(),
            )
        return PassResult(modified=False, stats=result.to_dict())
