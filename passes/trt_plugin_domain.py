"""The ``trt-plugin-domain`` pass: custom ops into the ``trt.plugins`` domain, and back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onnx import helper

from qdqkit.customops import NODE_KNOWN, NODE_UNKNOWN, TRT_PLUGIN_DOMAIN, canonical_domain, iter_nodes, op_class
from qdqkit.errors import UserError
from qdqkit.pass_infra import Pass, PassContext, PassResult


@dataclass
class TrtPluginDomainOptions:
    """``op_types``: only these op types (default: every custom op). ``inverse``: move back out of
    ``trt.plugins``. ``include_unknown``: also move custom ops that have no registered spec.
    ``plugin_namespace``: also write this TensorRT plugin namespace as the node attribute ``plugin_namespace``
    (TensorRT's ONNX parser reads it; Python plugins need a non-empty namespace without dots, which the
    ``trt.plugins`` domain cannot serve as)."""

    op_types: list[str] = field(default_factory=list)
    inverse: bool = False
    include_unknown: bool = True
    plugin_namespace: str = ""


class TrtPluginDomainPass(Pass):
    """Put custom ops in the ``trt.plugins`` domain, as onnxruntime's TensorRT provider requires.

    Forward:
      1. Every custom node (known, and unknown unless ``include_unknown`` is off), restricted to
         ``op_types`` when given, gets domain ``trt.plugins``; standard and onnxruntime-contrib nodes never move.
      2. The ``trt.plugins`` opset import (version 1) is added; opset imports of custom domains that no node uses
         any more are removed. The default-domain import always stays.
      3. The original domain of each moved node is recorded in ``ctx.state["trt-plugin-domain"]``.
      4. With ``plugin_namespace``, each moved node also gets that string attribute (an existing one is
         replaced).
    Inverse (``inverse = true``):
      1. Every ``trt.plugins`` node (restricted to ``op_types`` when given) goes back to the domain recorded in
         this run, else to its spec's own domain, else to the default domain ``""``.
      2. Opset imports follow (version 1 for restored custom domains; ``trt.plugins`` dropped once unused).
    A model with nothing to move is returned unchanged (``modified`` False).
    """

    name = "trt-plugin-domain"
    summary = "move custom ops into the trt.plugins domain (opset 1), or back with inverse=true"
    requires = frozenset({"custom-ops-known"})
    provides = frozenset({"trt-domain"})
    Options = TrtPluginDomainOptions

    def run(self, model: Any, ctx: PassContext) -> PassResult:
        proto = model.proto
        wanted = set(self.options.op_types)
        if wanted:
            present = {n.op_type for n in iter_nodes(proto.graph)}
            absent = sorted(wanted - present)
            if absent:
                raise UserError(f"trt-plugin-domain: op type(s) {', '.join(absent)} not found in the model")
        state = ctx.state.setdefault(self.name, {"moved": {}})
        moved: dict[str, int] = {}
        if self.options.inverse:
            originals = state.get("original_domain_by_op", {})
            for node in iter_nodes(proto.graph):
                if node.domain != TRT_PLUGIN_DOMAIN or (wanted and node.op_type not in wanted):
                    continue
                spec = ctx.custom_ops.lookup(TRT_PLUGIN_DOMAIN, node.op_type)
                target = originals.get(node.op_type, spec.domain if spec is not None else "")
                node.domain = canonical_domain(target)
                moved[node.op_type] = moved.get(node.op_type, 0) + 1
        else:
            classes = {NODE_KNOWN, NODE_UNKNOWN} if self.options.include_unknown else {NODE_KNOWN}
            # classified per op type, now: passes since detect-custom-ops may have added nodes
            movable: dict[tuple[str, str], bool] = {}
            originals = state.setdefault("original_domain_by_op", {})
            for node in iter_nodes(proto.graph):
                key = (node.domain, node.op_type)
                if key not in movable:
                    movable[key] = op_class(node, ctx.custom_ops) in classes
                if not movable[key] or node.domain == TRT_PLUGIN_DOMAIN:
                    continue
                if wanted and node.op_type not in wanted:
                    continue
                originals.setdefault(node.op_type, node.domain)
                node.domain = TRT_PLUGIN_DOMAIN
                moved[node.op_type] = moved.get(node.op_type, 0) + 1
                if self.options.plugin_namespace:
                    _set_string_attribute(node, "plugin_namespace", self.options.plugin_namespace)
        if not moved:
            return PassResult(modified=False, stats={"moved": {}})
        fix_opset_imports(proto)
        state["moved"] = moved
        return PassResult(modified=True, stats={"moved": moved, "inverse": self.options.inverse})


def _set_string_attribute(node: Any, name: str, value: str) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def fix_opset_imports(proto: Any) -> None:
    """Opset imports exactly for the domains the nodes use (version 1 for new ones; the default one always)."""
    used = {canonical_domain(n.domain) for n in iter_nodes(proto.graph)}
    for fn in proto.functions:
        used.add(canonical_domain(fn.domain))
    kept = [o for o in proto.opset_import if canonical_domain(o.domain) in used or canonical_domain(o.domain) == ""]
    have = {canonical_domain(o.domain) for o in kept}
    kept += [helper.make_opsetid(d, 1) for d in sorted(used - have)]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
