"""qdqkit plugin of the BEVFormer example: two recipes, the ``bevformer:`` calibration source and one pattern.

Recipes:
  1. ``bevformer-int8``: the original DL4AGX flow: detect-custom-ops, trt-plugin-domain, infer-shapes, qdq with
     every MatMul excluded (``--op_types_to_exclude MatMul``), simplify, validate.
  2. ``bevformer-int8-mha``: the same passes with qdqkit's structural rules instead: the attention cores
     (Q.K^T, softmax, .V) stay in high precision by the ``mha`` pattern and the camera projection by
     ``bevformer-geometry``; every projection MatMul (the Linear layers of the attention, FFN and head) is INT8.

Pattern ``bevformer-geometry``: MatMul/Gemm nodes fed (through layout ops only) by the ``lidar2img`` input; they
project 3-D points into pixels, where an INT8 step of a few pixels moves the sampling points and flips the
visibility masks.
"""

from __future__ import annotations

import networkx as nx

from qdqkit.hookspecs import hookimpl
from qdqkit.pipeline import Recipe, Step

CALIB_METHOD = "max"

_LAYOUT = {"Reshape", "Unsqueeze", "Squeeze", "Transpose", "Expand", "Tile", "Cast", "Identity", "Slice", "Gather",
           "Flatten", "Concat"}


def match_geometry(g: nx.DiGraph) -> set[str]:
    """MatMul/Gemm nodes whose input comes from the ``lidar2img`` graph input through layout ops only."""
    found = set()
    for n, d in g.nodes(data=True):
        if d["op_type"] not in ("MatMul", "Gemm"):
            continue
        stack, seen = list(d["inputs"][:2]), set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t == "lidar2img":
                found.add(n)
                break
            src = g.graph["producer"].get(t)
            if src is not None and g.nodes[src]["op_type"] in _LAYOUT:
                stack.extend(g.nodes[src]["inputs"][:1])
    return found


def _steps(qdq_options: dict, validate_options: dict) -> list[Step]:
    return [
        Step("detect-custom-ops"),
        Step("trt-plugin-domain"),
        Step("infer-shapes"),
        Step("qdq", qdq_options),
        Step("simplify"),
        Step("validate", validate_options),
    ]


RECIPES = (
    Recipe(
        "bevformer-int8",
        "BEVFormer INT8 as the DL4AGX recipe does it: every MatMul excluded (--op_types_to_exclude MatMul)",
        _steps(
            {"exclude_op_types": ["MatMul"], "calibration_method": CALIB_METHOD, "high_precision": "fp32"},
            {"min_cosine": 0.99},
        ),
    ),
    Recipe(
        "bevformer-int8-mha",
        "BEVFormer INT8 with structural rules: attention cores and camera projection in high precision, "
        "projection MatMuls in INT8",
        _steps(
            {"exclude_patterns": ["mha", "bevformer-geometry"], "calibration_method": CALIB_METHOD,
             "high_precision": "fp32"},
            {"min_cosine": 0.99},
        ),
    ),
)


@hookimpl
def qdqkit_register_recipes(registry):
    """The two BEVFormer recipes."""
    for recipe in RECIPES:
        registry.add(recipe)


@hookimpl
def qdqkit_register_rules(registry):
    """The ``bevformer-geometry`` exclusion pattern."""
    registry.add_pattern(
        "bevformer-geometry", match_geometry,
        "BEVFormer camera projection: MatMuls fed by the lidar2img input (pixel coordinates)",
    )


@hookimpl
def qdqkit_calibration_source(spec, inputs):
    """``bevformer:frames=N,seed=S,...``: synthetic temporal sequences (see qdqkit.examples.bevformer.calib)."""
    if not isinstance(spec, str) or not spec.startswith("bevformer:"):
        return None
    from .calib import source_from_spec

    return source_from_spec(spec, inputs)
