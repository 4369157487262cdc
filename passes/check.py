"""The ``check`` pass: the ONNX checker, with the registered custom-op schemas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from qdqkit.errors import UserError, ValidationFailed
from qdqkit.model import run_checker
from qdqkit.pass_infra import Pass, PassContext, PassResult


@dataclass
class CheckOptions:
    """``full``: also run strict shape inference as part of the check (the checker's ``full_check``); "auto"
    (default) does so unless this run already established the ``shapes`` fact (infer-shapes ran strict)."""

    full: bool | str = "auto"


class CheckPass(Pass):
    """Run ``onnx.checker`` on the model; custom ops are checked against their registered schemas.

    1. Custom ops with a spec are checked like standard ops (inputs, outputs, attributes, types).
    2. With ``full`` (by default unless ``infer-shapes`` already ran in this pipeline), strict shape inference
       runs too, so a custom op whose shape function rejects its inputs fails here.
    3. A model over 2 GB is checked without the bytes of its large weights (their types and shapes are kept).
    4. A failure stops the pipeline with ``ValidationFailed`` (exit code 1) and the checker's first line.
    The model is never changed.
    """

    name = "check"
    summary = "onnx.checker (full check with shape inference) using the registered custom-op schemas"
    Options = CheckOptions

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        full = self.options.full
        if full == "auto":
            full = "shapes" not in ctx.facts
        elif not isinstance(full, bool):
            raise UserError(f"check: option full must be true, false or \"auto\", got {full!r}")
        ctx.custom_ops.register_onnx_schemas()
        try:
            run_checker(model.proto, full_check=full)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValidationFailed(f"the model fails the ONNX checker: {first}") from None
        return PassResult(modified=False, stats={"full": full})
