"""The ``detect-custom-ops`` pass: a census of what every node is, without TensorRT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qdqkit.customops import classify_nodes
from qdqkit.errors import UserError
from qdqkit.pass_infra import Pass, PassContext, PassResult


@dataclass
class DetectOptions:
    """``fail_on_unknown``: stop with a clear error when a custom op has no registered spec."""

    fail_on_unknown: bool = False


class DetectCustomOpsPass(Pass):
    """Classify every node (subgraphs included) and record the census for later passes and the report.

    1. Standard ONNX: a node in an ONNX domain whose op has a built-in schema.
    2. onnxruntime contrib: a node in ``com.microsoft`` (and its sibling domains).
    3. Known custom op: a node a registered ``CustomOpSpec`` answers for, in ``""`` (how TensorRT plugin ops
       are usually exported), in ``trt.plugins`` or in the spec's own domain or alias.
    4. Unknown custom op: anything else, e.g. a default-domain op type no schema describes, or a node in a
       domain nobody registered.
    The model is never changed. The census goes to ``ctx.state["detect-custom-ops"]``: ``nodes`` maps each
    node's key (its name, or ``#<index>`` when unnamed) to ``{"class", "domain", "op_type", "spec"}``;
    ``unknown`` and ``known`` list the distinct ``domain::op_type`` of each kind.
    """

    name = "detect-custom-ops"
    summary = "classify nodes: standard, onnxruntime contrib, known custom op (registered spec), unknown custom op"
    provides = frozenset({"custom-ops-known"})
    Options = DetectOptions

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        census = classify_nodes(model.proto, ctx.custom_ops)
        ctx.state[self.name] = census
        if self.options.fail_on_unknown and census["unknown"]:
            raise UserError(
                f"custom op(s) without a spec: {', '.join(census['unknown'])}; register a CustomOpSpec through "
                "the qdqkit_register_custom_ops hook of a plugin (see `qdqkit ops` for the known ones)"
            )
        stats = {"counts": census["counts"], "known": census["known"], "unknown": census["unknown"]}
        return PassResult(modified=False, stats=stats)
