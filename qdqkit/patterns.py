"""Built-in structural exclusion patterns, found on the graph with networkx rather than by node names.

Each matcher takes the `graph_view` of a model (a networkx DiGraph: one vertex per ONNX node, keyed by node
name, with ``op_type``/``domain``/``inputs``/``outputs`` attributes; an edge per tensor from producer to
consumer) and returns the set of node names it covers.

  1. ``mha``: scaled-dot-product attention. A Softmax whose input comes, through element-wise and layout ops
     (scale Mul/Div, mask Add/Where, Cast, Reshape, Transpose), from a MatMul of two activations (Q·Kᵀ) and whose
     output goes, through the same kind of ops, into a MatMul of two activations (·V). Matched: both MatMuls, the
     Softmax and the ops between them; also fused ``Attention``/``MultiHeadAttention`` nodes. Projections
     (MatMul by a weight) are not part of the match, so they stay INT8.
  2. ``layernorm``: ``LayerNormalization`` nodes, and the decomposed form ReduceMean → Sub → Pow|Mul →
     ReduceMean → Add(eps) → Sqrt → Div, with the following affine Mul/Add by constants when present.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

# Ops that sit between the attention MatMuls and the Softmax in the exports seen in practice.
_ATTN_GLUE = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose", "Identity", "Dropout", "Squeeze",
              "Unsqueeze", "Expand"}
_FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
_LN_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization"}


def graph_view(model: Any) -> nx.DiGraph:
    """A networkx DiGraph of the ONNX graph (top level). Unnamed nodes get ``<op_type>_<index>`` as key.

    Graph attributes: ``constants`` (initializer names and outputs of Constant nodes), ``producer``
    (tensor -> node), ``consumers`` (tensor -> [nodes]), ``graph_inputs`` and ``graph_outputs``.
    """
    g = nx.DiGraph()
    constants = {t.name for t in model.graph.initializer}
    producer: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        key = node.name or f"{node.op_type}_{i}"
        g.add_node(key, op_type=node.op_type, domain=node.domain, inputs=list(node.input),
                   outputs=list(node.output), index=i)
        if node.op_type == "Constant":
            constants.update(node.output)
        for t in node.output:
            if t:
                producer[t] = key
        for t in node.input:
            if t:
                consumers.setdefault(t, []).append(key)
    for t, users in consumers.items():
        src = producer.get(t)
        if src is not None:
            for u in users:
                g.add_edge(src, u, tensor=t)
    g.graph.update(constants=constants, producer=producer, consumers=consumers,
                   graph_inputs=[v.name for v in model.graph.input if v.name not in constants],
                   graph_outputs=[v.name for v in model.graph.output])
    return g


def _is_activation(g: nx.DiGraph, tensor: str) -> bool:
    """True for a tensor computed at run time from the graph inputs (not a weight or a constant)."""
    if tensor in g.graph["constants"]:
        return False
    src = g.graph["producer"].get(tensor)
    if src is None:
        return tensor in g.graph["graph_inputs"]
    return g.nodes[src]["op_type"] != "Constant"


def _activation_matmul(g: nx.DiGraph, n: str) -> bool:
    d = g.nodes[n]
    return d["op_type"] == "MatMul" and all(_is_activation(g, t) for t in d["inputs"][:2])


def _walk(g: nx.DiGraph, start: str, forward: bool, limit: int = 8) -> tuple[str | None, list[str]]:
    """Follow glue ops from ``start`` (exclusive) to the first activation×activation MatMul, up or down.

    Returns (matmul, glue nodes passed) or (None, []) when the chain leaves the glue set or branches ambiguously.
    """
    path: list[str] = []
    frontier = [start]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            nbrs = g.successors(n) if forward else g.predecessors(n)
            for m in nbrs:
                if _activation_matmul(g, m):
                    return m, path
                if g.nodes[m]["op_type"] in _ATTN_GLUE:
                    nxt.append(m)
        if not nxt:
            return None, []
        path.extend(nxt)
        frontier = nxt
    return None, []


def match_mha(g: nx.DiGraph) -> set[str]:
    """Scaled-dot-product attention cores (see the module docstring, case 1)."""
    found: set[str] = set()
    for n, d in g.nodes(data=True):
        if d["op_type"] in _FUSED_ATTENTION:
            found.add(n)
        if d["op_type"] != "Softmax":
            continue
        qk, up = _walk(g, n, forward=False)
        av, down = _walk(g, n, forward=True)
        if qk is None or av is None:
            continue
        found.update([qk, n, av, *up, *down])
    return found


def _only_consumer(g: nx.DiGraph, n: str, op_types: set[str]) -> str | None:
    succ = [m for m in g.successors(n) if g.nodes[m]["op_type"] in op_types]
    return succ[0] if len(succ) == 1 else None


def _has_const_input(g: nx.DiGraph, n: str) -> bool:
    return any(t in g.graph["constants"] for t in g.nodes[n]["inputs"])


def match_layernorm(g: nx.DiGraph) -> set[str]:
    """LayerNorm, fused or decomposed (see the module docstring, case 2)."""
    found: set[str] = set()
    for n, d in g.nodes(data=True):
        if d["op_type"] in _LN_OPS:
            found.add(n)
            continue
        if d["op_type"] != "ReduceMean":
            continue
        x = d["inputs"][0]
        sub = next((m for m in g.successors(n) if g.nodes[m]["op_type"] == "Sub" and x in g.nodes[m]["inputs"]), None)
        if sub is None:
            continue
        sq = _only_consumer(g, sub, {"Pow", "Mul"})
        div = _only_consumer(g, sub, {"Div"})
        if sq is None or div is None:
            continue
        r2 = _only_consumer(g, sq, {"ReduceMean"})
        eps = _only_consumer(g, r2, {"Add"}) if r2 else None
        sqrt = _only_consumer(g, eps, {"Sqrt"}) if eps else None
        if sqrt is None or div not in set(g.successors(sqrt)):
            continue
        chain = [n, sub, sq, r2, eps, sqrt, div]
        mul = _only_consumer(g, div, {"Mul"})
        if mul is not None and _has_const_input(g, mul):
            chain.append(mul)
            add = _only_consumer(g, mul, {"Add"})
            if add is not None and _has_const_input(g, add):
                chain.append(add)
        found.update(chain)
    return found


BUILTIN_PATTERNS = {
    "mha": (match_mha, "multi-head attention cores: Q·Kᵀ MatMul → Softmax → ·V MatMul (structure, any glue ops)"),
    "layernorm": (match_layernorm, "LayerNormalization, fused or decomposed (ReduceMean/Sub/Pow/Sqrt/Div chain)"),
}
