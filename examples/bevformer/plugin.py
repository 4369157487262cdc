"""qdqkit plugin of the BEVFormer example: three recipes, the ``bevformer:`` calibration source, four patterns.

Recipes:
  1. ``bevformer-int8``: the original DL4AGX flow: detect-custom-ops, trt-plugin-domain, infer-shapes, qdq with
     every MatMul excluded (``--op_types_to_exclude MatMul``) and ModelOpt's default entropy calibration, simplify,
     validate.
  2. ``bevformer-int8-mha``: the same passes with qdqkit's rules instead of "no MatMul": the encoder's projection
     MatMuls (most of the transformer's FLOPs) go INT8; kept in high precision are the attention cores (Q.K^T,
     softmax, .V; pattern ``mha``), the camera projection (``bevformer-geometry``), the CNN residual sums
     (``residual-add``: their Convs stay INT8) and the decoder and head (node regexes), where INT8 measurably hurt
     the box outputs. More INT8 FLOPs than recipe 1 at equal or better fidelity (figures in the README).
  3. ``bevformer-fp16``: no INT8; the model typed FP16 for a strongly typed TensorRT build (the original recipe's
     FP16 engine, which TensorRT 11 no longer builds from an FP32 model with a flag), nodes whose values exceed
     FP16's safe range on the calibration frames kept FP32, validated like the others.

Patterns registered: ``bevformer-geometry`` (MatMul/Gemm fed by the ``lidar2img`` input through layout ops: the
projection of 3-D points into pixels, where an INT8 step moves sampling points and flips visibility masks),
``residual-add``, ``bevformer-temporal`` (element-wise nodes carrying the recurrent ``prev_bev``) and
``deformable-offsets`` (the Linear layers producing MSDA sampling offsets); see each matcher's docstring.
"""

from __future__ import annotations

import networkx as nx

from qdqkit.hookspecs import hookimpl
from qdqkit.pipeline import Recipe, Step

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


_OFFSET_PATH = {"Reshape", "Transpose", "Add", "Slice", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast",
                "DequantizeLinear", "QuantizeLinear"}


def match_deformable_offsets(g: nx.DiGraph) -> set[str]:
    """MatMul/Gemm nodes that compute the sampling offsets of a deformable-attention op (its 4th input).

    The offsets are pixel positions: an error of one INT8 step there moves every sampling point, whereas the same
    step on a feature only perturbs one value.
    """
    found = set()
    for n, d in g.nodes(data=True):
        if not d["op_type"].startswith("MultiScaleDeformableAttn") or len(d["inputs"]) < 4:
            continue
        stack, seen = [d["inputs"][3]], set()
        while stack:
            t = stack.pop()
            src = g.graph["producer"].get(t)
            if src is None or src in seen:
                continue
            seen.add(src)
            op = g.nodes[src]["op_type"]
            if op in ("MatMul", "Gemm"):
                found.add(src)
            elif op in _OFFSET_PATH:
                stack.extend(x for x in g.nodes[src]["inputs"] if x not in g.graph["constants"])
    return found


_STATE_PATH = {"Add", "Sub", "Mul", "Div", "Concat", "Slice", "Transpose", "Reshape", "Squeeze", "Unsqueeze",
               "Gather", "Identity", "Cast", "Expand", "Tile"}


def match_temporal_state(g: nx.DiGraph) -> set[str]:
    """Element-wise and layout nodes that carry the recurrent ``prev_bev`` state before any compute consumes it.

    ``bev_embed`` is fed back as the next frame's ``prev_bev``: an INT8 step on this path is re-injected frame after
    frame. These nodes hold no Conv/MatMul FLOPs, so keeping them in high precision costs no INT8 coverage.
    """
    found: set[str] = set()
    consumers = g.graph["consumers"]
    frontier = list(consumers.get("prev_bev", []))
    visited: set[str] = set()
    while frontier:
        n = frontier.pop()
        if n in visited:
            continue
        visited.add(n)
        d = g.nodes[n]
        if d["op_type"] in _STATE_PATH:
            found.add(n)
        elif not d["op_type"].startswith("Rotate"):  # the BEV rotation moves the state along; anything else uses it
            continue
        for t in d["outputs"]:
            frontier.extend(consumers.get(t, []))
    return found


def match_residual_adds(g: nx.DiGraph) -> set[str]:
    """Residual Adds of a CNN: an Add of two activations, at least one computed by a Conv (through Relu/BN).

    ModelOpt quantizes both inputs of such an Add so that TensorRT can fuse it into the Conv in INT8; that puts an
    INT8 step on the residual stream after every block. Excluded, the Convs keep their INT8 inputs and weights
    (the FLOPs stay INT8) and the sum runs in high precision.
    """
    found = set()
    for n, d in g.nodes(data=True):
        if d["op_type"] != "Add" or len(d["inputs"]) != 2:
            continue
        if any(t in g.graph["constants"] or t not in g.graph["producer"] for t in d["inputs"]):
            continue
        producers = [g.nodes[g.graph["producer"][t]]["op_type"] for t in d["inputs"]]
        if "Conv" in producers or "BatchNormalization" in producers:
            found.add(n)
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


# ModelOpt's default, which the original recipe ran with (it passes no --calibration_method).
CALIB_METHOD = "entropy"

# Decoder and head: 900 object queries whose box regression compounds any error through six refinements of the
# reference points; measured, their INT8 projections cost coords fidelity while holding only ~3% of the FLOPs.
DECODER_AND_HEAD = ["/pts_bbox_head/transformer/decoder/.*", r"/pts_bbox_head/(cls|reg)_branches\..*"]

RECIPES = (
    Recipe(
        "bevformer-fp16",
        "BEVFormer FP16 for a strongly typed TensorRT build: AutoCast with value ranges measured on the frames, "
        "no INT8",
        [Step("detect-custom-ops"), Step("trt-plugin-domain"), Step("infer-shapes"), Step("fp16"),
         Step("validate", {"min_cosine": 0.99})],
    ),
    Recipe(
        "bevformer-int8",
        "BEVFormer INT8 as the DL4AGX recipe does it: every MatMul excluded (--op_types_to_exclude MatMul), "
        "entropy calibration",
        _steps(
            {"exclude_op_types": ["MatMul"], "calibration_method": CALIB_METHOD, "high_precision": "fp32"},
            {"min_cosine": 0.99},
        ),
    ),
    Recipe(
        "bevformer-int8-mha",
        "BEVFormer INT8 with structural rules: encoder projections INT8; attention cores (mha), camera "
        "projection, CNN residual sums, decoder and head in high precision",
        _steps(
            {"exclude_patterns": ["mha", "bevformer-geometry", "residual-add"], "exclude_nodes": DECODER_AND_HEAD,
             "calibration_method": CALIB_METHOD, "high_precision": "fp32"},
            {"min_cosine": 0.99},
        ),
    ),
)


@hookimpl
def qdqkit_register_recipes(registry):
    """The three BEVFormer recipes."""
    for recipe in RECIPES:
        registry.add(recipe)


@hookimpl
def qdqkit_register_rules(registry):
    """The ``bevformer-geometry`` exclusion pattern."""
    registry.add_pattern(
        "bevformer-geometry", match_geometry,
        "BEVFormer camera projection: MatMuls fed by the lidar2img input (pixel coordinates)",
    )
    registry.add_pattern(
        "bevformer-temporal", match_temporal_state,
        "element-wise nodes on the recurrent prev_bev path before its first Conv/MatMul (no FLOPs)",
    )
    registry.add_pattern(
        "residual-add", match_residual_adds,
        "Add of two activations fed by a Conv (CNN residual sums): the sum stays high precision, Convs stay INT8",
    )
    registry.add_pattern(
        "deformable-offsets", match_deformable_offsets,
        "the Linear layers that compute deformable-attention sampling offsets (pixel positions)",
    )


@hookimpl
def qdqkit_calibration_source(spec, inputs):
    """``bevformer:frames=N,seed=S,...``: synthetic temporal sequences (see qdqkit.examples.bevformer.calib)."""
    if not isinstance(spec, str) or not spec.startswith("bevformer:"):
        return None
    from .calib import source_from_spec

    return source_from_spec(spec, inputs)
