"""Exclusion rules: which nodes the ``qdq`` pass leaves in high precision (the ``fp16`` pass: in FP32), and why.

Rule kinds (the label each gets in the report is ``kind:value``):
  1. ``op-type:MatMul``: every node of that op type (exact spelling; a near miss is suggested).
  2. ``node:REGEX``: node names that the regular expression matches in FULL (``re.fullmatch``), so ``attn`` does
     not match ``attn_out``; write ``attn.*`` for a prefix. (ModelOpt's own option anchors only the start.)
  3. ``node-glob:GLOB``: node names matching a shell glob (``fnmatchcase``): ``*``, ``?``, ``[..]``.
  4. ``between:A..B``: every node on a path from a consumer of tensor A to the producer of tensor B, both included.
  5. ``pattern:NAME``: a named structural pattern registered by a plugin (``mha`` and ``layernorm`` built in).

A rule that matches no node is an error, because a silent no-op exclusion is the commonest quantization
complaint; mark a rule optional to allow it (its label, or just its value, in ``optional_rules``).

TOML form: the ``qdq`` step of a pipeline file (``qdqkit apply --config FILE.toml``) takes the option names::

    [[pass]]
    name = "qdq"
    exclude_op_types = ["MatMul"]
    exclude_nodes = ["head/.*"]            # regex, full match
    exclude_nodes_glob = ["*/attn/*"]
    exclude_between = [["t_in", "t_out"]]
    exclude_patterns = ["mha"]
    optional_rules = ["pattern:layernorm", "head/.*"]

A plugin or a standalone rule file may use the shorter ``[exclude]`` table read by
`ExclusionRules.from_toml_table` (keys op_types, nodes, nodes_glob, between, patterns, optional).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from qdqkit.errors import UserError
from qdqkit.patterns import BUILTIN_PATTERNS, graph_view

Matcher = Callable[[nx.DiGraph], set[str]]


@dataclass(frozen=True)
class Pattern:
    """A named structural pattern: ``matcher(graph_view) -> node names``."""

    name: str
    matcher: Matcher
    description: str
    origin: str = "?"


class RuleRegistry:
    """Named exclusion patterns, filled through the ``qdqkit_register_rules`` hook."""

    def __init__(self) -> None:
        self._patterns: dict[str, Pattern] = {}
        self.current_plugin = "?"

    def add_pattern(self, name: str, matcher: Matcher, description: str) -> None:
        """Register ``matcher`` under ``name`` (used as ``--exclude-pattern NAME``)."""
        if name in self._patterns and self._patterns[name].matcher is not matcher:
            raise ValueError(
                f"exclusion pattern '{name}' registered twice: by plugin '{self._patterns[name].origin}' and by "
                f"'{self.current_plugin}'"
            )
        self._patterns[name] = Pattern(name, matcher, description, self.current_plugin)

    def add_builtins(self) -> None:
        """Register the built-in ``mha`` and ``layernorm`` patterns (what the built-in plugin does)."""
        for name, (matcher, description) in BUILTIN_PATTERNS.items():
            self.add_pattern(name, matcher, description)

    def get(self, name: str) -> Pattern:
        try:
            return self._patterns[name]
        except KeyError:
            known = ", ".join(sorted(self._patterns)) or "none"
            raise UserError(f"unknown exclusion pattern '{name}'; known patterns: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._patterns

    def __iter__(self):
        return iter(sorted(self._patterns))


@dataclass(frozen=True)
class Rule:
    """One exclusion rule. ``kind`` is op-type, node, node-glob, between or pattern."""

    kind: str
    value: str | tuple[str, str]
    optional: bool = False

    @property
    def label(self) -> str:
        v = f"{self.value[0]}..{self.value[1]}" if isinstance(self.value, tuple) else self.value
        return f"{self.kind}:{v}"


@dataclass
class Resolution:
    """The nodes excluded, and for each rule (by label) the nodes it matched, in graph order."""

    excluded: list[str] = field(default_factory=list)
    by_rule: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"excluded_nodes": len(self.excluded), "by_rule": self.by_rule}


@dataclass
class RuleOptions:
    """The rule options the ``qdq`` and ``fp16`` passes share (their ``Options`` extend this). ``exclude_nodes``
    are regexes matched against the FULL node name; ``exclude_nodes_glob`` shell globs; ``exclude_between``
    pairs of tensor names; ``optional_rules`` labels (``pattern:mha``) or values of rules allowed to match
    nothing."""

    exclude_op_types: list[str] = field(default_factory=list)
    exclude_nodes: list[str] = field(default_factory=list)
    exclude_nodes_glob: list[str] = field(default_factory=list)
    exclude_between: list[list[str]] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)
    optional_rules: list[str] = field(default_factory=list)


class ExclusionRules:
    """An ordered set of rules; ``resolve`` turns them into node names for one model."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = list(rules)

    @classmethod
    def from_rule_options(cls, o: RuleOptions) -> ExclusionRules:
        """Build rules from a pass's ``RuleOptions``."""
        return cls.from_options(op_types=o.exclude_op_types, nodes=o.exclude_nodes, nodes_glob=o.exclude_nodes_glob,
                                between=o.exclude_between, patterns=o.exclude_patterns, optional=o.optional_rules)

    @classmethod
    def from_options(
        cls,
        op_types: Iterable[str] = (),
        nodes: Iterable[str] = (),
        nodes_glob: Iterable[str] = (),
        between: Iterable[Iterable[str]] = (),
        patterns: Iterable[str] = (),
        optional: Iterable[str] = (),
    ) -> ExclusionRules:
        """Build rules from the ``qdq`` pass options (CLI flags and TOML keys map onto these)."""
        raw: list[tuple[str, str | tuple[str, str]]] = []
        raw += [("op-type", t) for t in op_types]
        for rx in nodes:
            try:
                re.compile(rx)
            except re.error as e:
                raise UserError(f"exclusion regex '{rx}' is invalid: {e}") from None
            raw.append(("node", rx))
        raw += [("node-glob", g) for g in nodes_glob]
        for pair in between:
            pair = list(pair)
            if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
                raise UserError(f"exclude_between takes pairs of tensor names [from, to], got {pair!r}")
            raw.append(("between", (pair[0], pair[1])))
        raw += [("pattern", p) for p in patterns]
        optional = set(optional)
        rules = []
        for kind, value in raw:
            r = Rule(kind, value)
            plain = r.label.split(":", 1)[1]
            rules.append(Rule(kind, value, optional=r.label in optional or plain in optional))
        unused = optional - {r.label for r in rules} - {r.label.split(":", 1)[1] for r in rules}
        if unused:
            raise UserError(
                f"optional_rules names {', '.join(sorted(unused))}, which is no rule given; use a rule's label "
                "(e.g. pattern:mha) or value"
            )
        return cls(rules)

    @classmethod
    def from_toml_table(cls, table: dict[str, Any]) -> ExclusionRules:
        """Build rules from an ``[exclude]`` TOML table (see the module docstring)."""
        keys = {"op_types", "nodes", "nodes_glob", "between", "patterns", "optional"}
        unknown = sorted(set(table) - keys)
        if unknown:
            raise UserError(f"[exclude] has unknown keys {', '.join(unknown)}; known: {', '.join(sorted(keys))}")
        return cls.from_options(
            op_types=table.get("op_types", ()), nodes=table.get("nodes", ()), nodes_glob=table.get("nodes_glob", ()),
            between=table.get("between", ()), patterns=table.get("patterns", ()), optional=table.get("optional", ()),
        )

    def resolve(self, model: Any, registry: RuleRegistry | None = None, graph: nx.DiGraph | None = None) -> Resolution:
        """Match every rule on ``model``; raise a UserError for a non-optional rule that matches nothing."""
        g = graph if graph is not None else graph_view(model)
        order = {n: d["index"] for n, d in g.nodes(data=True)}
        res = Resolution()
        excluded: set[str] = set()
        for rule in self.rules:
            hits = self._match(rule, g, registry)
            if not hits and not rule.optional:
                raise UserError(self._no_match_message(rule, g))
            res.by_rule[rule.label] = sorted(hits, key=order.__getitem__)
            excluded |= hits
        res.excluded = sorted(excluded, key=order.__getitem__)
        return res

    @staticmethod
    def _match(rule: Rule, g: nx.DiGraph, registry: RuleRegistry | None) -> set[str]:
        if rule.kind == "op-type":
            return {n for n, d in g.nodes(data=True) if d["op_type"] == rule.value}
        if rule.kind == "node":
            rx = re.compile(rule.value)
            return {n for n in g.nodes if rx.fullmatch(n)}
        if rule.kind == "node-glob":
            return {n for n in g.nodes if fnmatch.fnmatchcase(n, rule.value)}
        if rule.kind == "between":
            return _between(g, *rule.value)
        if rule.kind == "pattern":
            if registry is None:
                raise UserError(f"exclusion pattern '{rule.value}' cannot be used: no pattern registry is loaded")
            return set(registry.get(rule.value).matcher(g)) & set(g.nodes)
        raise ValueError(f"unknown rule kind {rule.kind!r}")

    @staticmethod
    def _no_match_message(rule: Rule, g: nx.DiGraph) -> str:
        hint = ""
        if rule.kind == "op-type":
            ops = sorted({d["op_type"] for _, d in g.nodes(data=True)})
            close = difflib.get_close_matches(rule.value, ops, n=1) or [
                o for o in ops if o.lower() == str(rule.value).lower()
            ]
            hint = f" (did you mean {close[0]}?)" if close else ""
        elif rule.kind in ("node", "node-glob"):
            close = difflib.get_close_matches(str(rule.value), list(g.nodes), n=1)
            hint = f" (closest node name: {close[0]})" if close else ""
        return (
            f"exclusion rule {rule.label} matches no node in the model{hint}; fix it, or mark it optional "
            f"(optional_rules / --optional-rule {rule.label})"
        )


def _between(g: nx.DiGraph, start: str, end: str) -> set[str]:
    consumers = g.graph["consumers"].get(start)
    producer = g.graph["producer"].get(end)
    for name, ok in ((start, consumers), (end, producer)):
        if not ok:
            role = "consumed" if name == start else "produced"
            raise UserError(f"exclude_between: tensor '{name}' is not {role} by any node of the model")
    forward: set[str] = set()
    for c in consumers:
        forward |= {c} | nx.descendants(g, c)
    backward = {producer} | nx.ancestors(g, producer)
    return forward & backward
