"""The plugin ops' maths as ONNX functions of standard ops: the CPU implementation onnxruntime runs.

onnxruntime inlines a model-local FunctionProto into every session, ModelOpt's own included, and runs it with its
native kernels; nothing is marshalled through Python. The registry attaches these functions to the execution copy
of a model and strips them from the model written for TensorRT. Every builder takes the model's default-domain
opset (13..21 must work) because onnxruntime inlines the body at that opset:

- MSDA: first a table of 2x2 pixel neighbourhoods (every level zero-padded to the largest one plus a border,
  so the plugin's out-of-image corners are zeros in the table), then, for the (b, q, m) rows that sample
  anything inside the image, one Gather of 4*D-wide rows and one batched MatMul with the softmax x bilinear
  weights, scattered back into zeros; valid at every opset.
  Two alternatives stay selectable for the benchmark: four Gathers of D-wide rows with the bounds folded into
  the weights ("gather"), and, from opset 16, one GridSample call over all levels ("gridsample"). Measured at
  BEVFormer-tiny shapes on 2 cores (``benchmarks/cpu_ops_bench.py``) the table is the fastest.
- Rotate: explicit inverse rotation and Gather; the ``interpolation`` attribute is read through an attribute
  reference and an If runs only the nearest or the bilinear branch.
- ModulatedDeformableConv2d: Gather-based im2col with moving taps, then a grouped MatMul.
- GridSampler2D: GridSample (opset >= 16), the (int) mode attributes mapped to its string modes through If.

Inputs are cast to float32 inside and the result cast back to input 0's type (CastLike, opset >= 15), so fp16
models run too; at opsets 13-14 the function computes and returns float32 (an fp16 model there needs its
execution copy upgraded to opset 15).
"""

from __future__ import annotations

import itertools

import onnx
from onnx import TensorProto, helper

from qdqkit.errors import UserError

__all__ = [
    "grid_sample2d_function",
    "modulated_deform_conv2d_function",
    "ms_deform_attn_function",
    "rotate_function",
]

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64

# How MSDA samples: "table" (shipped), "gather" or "gridsample" (opset >= 16); chosen by measurement
# (benchmarks/cpu_ops_bench.py), the others kept selectable for that comparison.
MSDA_SAMPLER = "table"


class _Body:
    """Collects the nodes of a function body; each op call returns its output name(s)."""

    def __init__(self, prefix: str, counter=None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = counter if counter is not None else itertools.count()
        self.prefix = prefix

    def branch(self, name: str) -> tuple[_Body, callable]:
        """A body for an If branch (names stay unique); call the returned function to get its GraphProto."""
        sub = _Body(self.prefix, self._n)

        def graph(result: str) -> onnx.GraphProto:
            out = f"{self.prefix}_{name}_out_{next(self._n)}"
            sub.Identity(result)
            sub.nodes[-1].output[0] = out
            return helper.make_graph(
                sub.nodes, f"{self.prefix}_{name}", [], [helper.make_value_info(out, onnx.TypeProto())]
            )

        return sub, graph

    def __getattr__(self, op_type: str):
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: str, outputs: int = 1, **attrs):
            n = next(self._n)
            names = [f"{self.prefix}_{op_type}_{n}_{i}" for i in range(outputs)]
            # node names survive inlining in onnxruntime's profile: they let a profile attribute time to the op
            self.nodes.append(
                helper.make_node(op_type, list(inputs), names, name=f"{self.prefix}/{op_type}_{n}", **attrs)
            )
            return names[0] if outputs == 1 else names

        return make

    def const(self, value, dtype: int = INT64) -> str:
        """A constant tensor; a Python scalar gives a 0-d tensor, a list a 1-D tensor."""
        dims = [] if not isinstance(value, (list, tuple)) else [len(value)]
        vals = list(value) if isinstance(value, (list, tuple)) else [value]
        return self.Constant(value=helper.make_tensor(f"{self.prefix}_c{next(self._n)}", dtype, dims, vals))

    def attr_const(self, attr: str, kind: int) -> str:
        """A constant that takes the value of the calling node's attribute ``attr`` (attribute reference)."""
        field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.INTS: "value_ints"}[kind]
        name = f"{self.prefix}_attr_{attr}_{next(self._n)}"
        node = helper.make_node("Constant", [], [name])
        ref = onnx.AttributeProto()
        ref.name = field
        ref.ref_attr_name = attr
        ref.type = kind
        node.attribute.append(ref)
        self.nodes.append(node)
        return name

    def dim(self, shape: str, i: int) -> str:
        """Element i of a shape vector, as a 1-D tensor of one element."""
        return self.Slice(shape, self.const([i]), self.const([i + 1]))

    def scalar(self, vec1: str) -> str:
        return self.Squeeze(vec1, self.const([0]))

    def to_float(self, x: str) -> str:
        return self.Cast(x, to=FLOAT)

    def cast_back(self, x: str, like: str, opset: int) -> str:
        return self.CastLike(x, like) if opset >= 15 else self.Identity(x)


def _function(
    name: str, inputs, outputs, body: _Body, opset: int, attributes=(), attribute_protos=()
) -> onnx.FunctionProto:
    fn = helper.make_function(
        domain="trt.plugins",  # the registry sets the domain and name of the nodes it backs
        fname=name,
        inputs=list(inputs),
        outputs=list(outputs),
        nodes=body.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(attributes),
        attribute_protos=list(attribute_protos),
    )
    return fn


def _check_opset(opset: int, op: str) -> None:
    if opset < 13:
        raise UserError(
            f"{op}: the model's default opset is {opset}, the CPU implementation needs opset 13 or later; "
            "upgrade the model with onnx.version_converter"
        )


# ------------------------------------------------------------------------------------------------------------------
# MultiScaleDeformableAttn
# ------------------------------------------------------------------------------------------------------------------


def ms_deform_attn_function(opset: int, sampler: str | None = None) -> onnx.FunctionProto:
    """MSDA (bevformer-tiny.md §4.2) as standard ops valid at ``opset``.

    ``sampler`` picks "table", "gather" or "gridsample" (the latter needs opset >= 16); default ``MSDA_SAMPLER``.
    """
    _check_opset(opset, "MultiScaleDeformableAttn")
    sampler = sampler or MSDA_SAMPLER
    if sampler == "gridsample" and opset < 16:
        raise ValueError("the GridSample formulation of MSDA needs opset 16 or later")
    b = _Body("msda")
    value = b.to_float("value")
    refs = b.to_float("reference_points")
    offs = b.to_float("sampling_offsets")
    logits = b.to_float("attention_weights")

    vshape = b.Shape(value)
    B, S, M, D = (b.dim(vshape, i) for i in range(4))
    Q = b.dim(b.Shape(offs), 1)
    LP = b.dim(b.Shape(logits), 3)
    shapes = b.Cast("spatial_shapes", to=INT64)  # int32 in TensorRT-8-era models
    L = b.dim(b.Shape(shapes), 0)
    P = b.Div(LP, L)
    G = b.Div(b.dim(b.Shape(refs), 3), b.const([2]))

    Hs = b.Gather(shapes, b.const(0), axis=1)  # [L] int64
    Ws = b.Gather(shapes, b.const(1), axis=1)
    Hf = b.Unsqueeze(b.to_float(Hs), b.const([1]))  # [L, 1], broadcasts over [.., L, P]
    Wf = b.Unsqueeze(b.to_float(Ws), b.const([1]))

    off = b.Reshape(offs, b.Concat(B, Q, M, L, P, b.const([2]), axis=0))
    off_x = b.Gather(off, b.const(0), axis=5)  # [B,Q,M,L,P]
    off_y = b.Gather(off, b.const(1), axis=5)

    # point p of every level uses reference group p mod G, shared by all heads
    ref = b.Reshape(refs, b.Concat(B, Q, b.const([1]), G, b.const([2]), axis=0))  # [B,Q,1,G,2]
    group_of_point = b.Mod(b.Range(b.const(0), b.scalar(P), b.const(1)), b.scalar(G))
    ref = b.Unsqueeze(b.Gather(ref, group_of_point, axis=3), b.const([2]))  # [B,Q,1,1,P,2]
    ref_x = b.Gather(ref, b.const(0), axis=5)  # [B,Q,1,1,P]
    ref_y = b.Gather(ref, b.const(1), axis=5)

    half = b.const(0.5, FLOAT)
    x = b.Sub(b.Add(b.Mul(ref_x, Wf), off_x), half)  # pixel coordinates, [B,Q,M,L,P]
    y = b.Sub(b.Add(b.Mul(ref_y, Hf), off_y), half)

    # softmax over all L*P logits of one (b, q, m), as the plugin does (out-of-bounds points included)
    if sampler != "table":  # the table form takes it on the rows it computes only
        w = b.Reshape(b.Softmax(logits, axis=-1), b.Concat(B, Q, M, L, P, axis=0))  # [B,Q,M,L,P]
    if sampler == "gridsample":
        out = _msda_gridsample(b, value, x, y, w, B, S, M, D, Q, L, P, Hs, Ws, opset)
    elif sampler == "table":
        out = _msda_corner_table(b, value, x, y, logits, B, S, M, D, Q, L, P, Hs, Ws, Hf, Wf)
    elif sampler == "gather":
        out = _msda_gather(b, value, x, y, w, B, S, M, D, Q, L, P, Hs, Ws, Hf, Wf)
    else:
        raise ValueError(f"unknown MSDA sampler {sampler!r}: use 'table', 'gather' or 'gridsample'")
    b.cast_back(out, "value", opset)
    b.nodes[-1].output[0] = "output"
    return _function(
        "MultiScaleDeformableAttnTRT",
        ["value", "spatial_shapes", "reference_points", "sampling_offsets", "attention_weights"],
        ["output"],
        b,
        opset,
    )


def _msda_gather(b: _Body, value, x, y, w, B, S, M, D, Q, L, P, Hs, Ws, Hf, Wf) -> str:
    """Bilinear sampling by Gather of value rows: one Gather and one batched MatMul per corner."""
    one = b.const(1.0, FLOAT)
    zero = b.const(0.0, FLOAT)
    x0 = b.Floor(x)
    y0 = b.Floor(y)
    lx = b.Sub(x, x0)
    ly = b.Sub(y, y0)
    # a corner outside the level contributes zero: fold its validity into its weight
    Wm1 = b.Sub(Wf, one)
    Hm1 = b.Sub(Hf, one)

    def axis_terms(c0, frac, size_m1):
        c1 = b.Add(c0, one)
        terms = []
        for c, wt in ((c0, b.Sub(one, frac)), (c1, frac)):
            valid = b.And(b.GreaterOrEqual(c, zero), b.LessOrEqual(c, size_m1))
            clamped = b.Max(b.Min(c, size_m1), zero)
            terms.append((b.Cast(clamped, to=INT64), b.Mul(wt, b.Cast(valid, to=FLOAT))))
        return terms

    xs = axis_terms(x0, lx, Wm1)
    ys = axis_terms(y0, ly, Hm1)

    # value rows in [B*M*S, D] order; row of (b, m, s) = (b*M + m)*S + s
    rows = b.Reshape(b.Transpose(value, perm=[0, 2, 1, 3]), b.Concat(b.const([-1]), D, axis=0))
    hw = b.Mul(Hs, Ws)
    starts = b.Unsqueeze(b.Sub(b.CumSum(hw, b.const(0)), hw), b.const([1]))  # [L,1]
    Ws_col = b.Unsqueeze(Ws, b.const([1]))
    b_idx = b.Reshape(b.Range(b.const(0), b.scalar(B), b.const(1)), b.const([-1, 1, 1, 1, 1]))
    m_idx = b.Reshape(b.Range(b.const(0), b.scalar(M), b.const(1)), b.const([1, 1, -1, 1, 1]))
    base = b.Mul(b.Add(b.Mul(b_idx, M), m_idx), S)  # [B,1,M,1,1]
    base = b.Add(base, starts)  # [B,1,M,L,1]

    flat_shape = b.Concat(B, Q, M, b.const([-1]), axis=0)  # [B,Q,M,L*P]
    acc = None
    for yi, wy in ys:
        for xi, wx in xs:
            idx = b.Add(base, b.Add(b.Mul(yi, Ws_col), xi))  # [B,Q,M,L,P]
            cw = b.Mul(w, b.Mul(wy, wx))
            gathered = b.Gather(rows, b.Reshape(idx, flat_shape), axis=0)  # [B,Q,M,L*P,D]
            part = b.MatMul(b.Unsqueeze(b.Reshape(cw, flat_shape), b.const([3])), gathered)  # [B,Q,M,1,D]
            acc = part if acc is None else b.Add(acc, part)
    return b.Squeeze(acc, b.const([3]))


def _msda_corner_table(b: _Body, value, x, y, logits, B, S, M, D, Q, L, P, Hs, Ws, Hf, Wf) -> str:
    """Bilinear sampling through a table of 2x2 neighbourhoods: one Gather of 4*D-wide rows and one MatMul.

    Row (b, m, l, ty, tx) of the table holds the pixels (ty+dy, tx+dx), dy, dx in {0, 1}, of level l, zero where
    that pixel lies outside the level; top-left corners run from -2 to the largest level's size. A sample whose
    floor is (x0, y0) reads row (clamp(y0, -2, H_l), clamp(x0, -2, W_l)): inside [-1, size-1] that is its own
    neighbourhood, with the plugin's out-of-image corners as zeros, and anywhere else four zeros, which is the
    plugin's "outside (-1, size)". So no sample needs a bounds mask.

    Only the (b, q, m) with at least one sample inside are computed: in spatial cross-attention most camera and
    query pairs see nothing (the plugin's output is zero there). They are compacted with NonZero and the results
    scattered back; the indices are unique, so ScatterND needs no reduction (valid from opset 13).
    """
    one_i = b.const(1)
    two_i = b.const(2)
    Hp = b.Add(b.ReduceMax(Hs, keepdims=1), b.const([3]))  # top-left rows -2 .. Hmax
    Wp = b.Add(b.ReduceMax(Ws, keepdims=1), b.const([3]))
    hw = b.Mul(Hs, Ws)
    starts = b.Reshape(b.Sub(b.CumSum(hw, b.const(0)), hw), b.const([-1, 1, 1]))
    H3 = b.Reshape(Hs, b.const([-1, 1, 1]))
    W3 = b.Reshape(Ws, b.const([-1, 1, 1]))
    top = b.Reshape(b.Sub(b.Range(b.const(0), b.scalar(Hp), one_i), two_i), b.const([1, -1, 1]))
    left = b.Reshape(b.Sub(b.Range(b.const(0), b.scalar(Wp), one_i), two_i), b.const([1, 1, -1]))
    corners = []
    for dy in (0, 1):
        for dx in (0, 1):
            yy = b.Add(top, b.const(dy))
            xx = b.Add(left, b.const(dx))
            inside = b.And(
                b.And(b.GreaterOrEqual(yy, b.const(0)), b.Less(yy, H3)),
                b.And(b.GreaterOrEqual(xx, b.const(0)), b.Less(xx, W3)),
            )
            src = b.Where(inside, b.Add(starts, b.Add(b.Mul(yy, W3), xx)), S)  # [L,Hp,Wp], S = the zero row
            corners.append(b.Unsqueeze(src, b.const([3])))
    src = b.Reshape(b.Concat(*corners, axis=3), b.const([-1]))  # [L*Hp*Wp*4]
    v = b.Pad(b.Transpose(value, perm=[0, 2, 1, 3]), b.const([0, 0, 0, 0, 0, 0, 1, 0]))  # [B,M,S+1,D]
    table = b.Reshape(b.Gather(v, src, axis=2), b.Concat(b.const([-1]), b.Mul(D, b.const([4])), axis=0))

    # which (b, q, m) rows have a sample inside (-1, W) x (-1, H)
    LP = b.Mul(L, P)
    per_row = b.Concat(b.const([-1]), LP, axis=0)
    m1 = b.const(-1.0, FLOAT)
    inside = b.And(b.And(b.Greater(x, m1), b.Less(x, Wf)), b.And(b.Greater(y, m1), b.Less(y, Hf)))
    hits = b.ReduceSum(b.Reshape(b.Cast(inside, to=FLOAT), per_row), b.const([1]), keepdims=0)
    rows = b.Reshape(b.NonZero(b.Greater(hits, b.const(0.0, FLOAT))), b.const([-1, 1]))  # [1, n] -> [n, 1]
    r = b.Squeeze(rows, b.const([1]))
    xa = b.Gather(b.Reshape(x, per_row), r, axis=0)  # [n, L*P]
    ya = b.Gather(b.Reshape(y, per_row), r, axis=0)
    wa = b.Softmax(
        b.Gather(b.Reshape(logits, per_row), r, axis=0), axis=-1
    )  # softmax of the active rows only

    one = b.const(1.0, FLOAT)
    x0 = b.Floor(xa)
    y0 = b.Floor(ya)
    lx = b.Sub(xa, x0)
    ly = b.Sub(ya, y0)
    wy = b.Concat(
        b.Unsqueeze(b.Mul(wa, b.Sub(one, ly)), b.const([2, 3])),
        b.Unsqueeze(b.Mul(wa, ly), b.const([2, 3])),
        axis=2,
    )  # [n, L*P, 2, 1]
    wx = b.Concat(b.Unsqueeze(b.Sub(one, lx), b.const([2, 3])), b.Unsqueeze(lx, b.const([2, 3])), axis=3)
    n = b.Shape(r)  # explicit sizes below: a reshape with -1 is ambiguous when no row is active (n = 0)
    LP4 = b.Mul(LP, b.const([4]))
    cw = b.Reshape(b.Mul(wy, wx), b.Concat(n, b.const([1]), LP4, axis=0))  # [n, 1, L*P*4]

    # per-column level sizes ([L*P], level-major) for the clamps
    LPshape = b.Concat(L, P, axis=0)
    Wcol = b.Reshape(b.Expand(Wf, LPshape), b.const([-1]))
    Hcol = b.Reshape(b.Expand(Hf, LPshape), b.const([-1]))
    lcol = b.Reshape(
        b.Expand(b.Unsqueeze(b.Range(b.const(0), b.scalar(L), one_i), b.const([1])), LPshape), b.const([-1])
    )
    m2 = b.const(-2.0, FLOAT)
    Wpf = b.to_float(Wp)
    shift = b.Add(b.Mul(Wpf, b.const(2.0, FLOAT)), b.const(2.0, FLOAT))
    # float32 is exact here while a level plane has fewer than 2**24 cells
    cell = b.Add(b.Mul(b.Max(b.Min(y0, Hcol), m2), Wpf), b.Add(b.Max(b.Min(x0, Wcol), m2), shift))
    # row r = (b*Q + q)*M + m reads table plane (b*M + m)*L + l
    plane = b.Mul(Hp, Wp)
    b_idx = b.Reshape(b.Range(b.const(0), b.scalar(B), one_i), b.const([-1, 1, 1]))
    m_idx = b.Reshape(b.Range(b.const(0), b.scalar(M), one_i), b.const([1, 1, -1]))
    row_base = b.Mul(b.Mul(b.Add(b.Mul(b_idx, M), m_idx), L), plane)  # [B,1,M]
    row_base = b.Reshape(b.Expand(row_base, b.Concat(B, Q, M, axis=0)), b.const([-1]))  # [B*Q*M]
    base = b.Add(b.Unsqueeze(b.Gather(row_base, r, axis=0), b.const([1])), b.Mul(lcol, plane))  # [n, L*P]
    idx = b.Add(base, b.Cast(cell, to=INT64))
    gathered = b.Gather(table, idx, axis=0)  # [n, L*P, 4D]
    gathered = b.Reshape(gathered, b.Concat(n, LP4, D, axis=0))  # [n, L*P*4, D], the table's corner order
    part = b.Squeeze(b.MatMul(cw, gathered), b.const([1]))  # [n, D]
    BQM = b.Mul(b.Mul(B, Q), M)
    zeros = b.ConstantOfShape(b.Concat(BQM, D, axis=0), value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
    out = b.ScatterND(zeros, rows, part)  # [B*Q*M, D]
    return b.Reshape(out, b.Concat(B, Q, M, D, axis=0))


def _msda_gridsample(b: _Body, value, x, y, w, B, S, M, D, Q, L, P, Hs, Ws, opset) -> str:
    """All levels in one GridSample call: level l zero-padded to (Hmax, Wmax), levels folded into the batch."""
    one_i = b.const(1)
    Hmax = b.ReduceMax(Hs, keepdims=1)  # no axes: reduce all (valid before and after opset 18)
    Wmax = b.ReduceMax(Ws, keepdims=1)
    # source row of every padded pixel: start_l + h*W_l + w inside level l, else S (an appended zero row)
    hw = b.Mul(Hs, Ws)
    starts = b.Reshape(b.Sub(b.CumSum(hw, b.const(0)), hw), b.const([-1, 1, 1]))
    H3 = b.Reshape(Hs, b.const([-1, 1, 1]))
    W3 = b.Reshape(Ws, b.const([-1, 1, 1]))
    hh = b.Reshape(b.Range(b.const(0), b.scalar(Hmax), one_i), b.const([1, -1, 1]))
    ww = b.Reshape(b.Range(b.const(0), b.scalar(Wmax), one_i), b.const([1, 1, -1]))
    inside = b.And(b.Less(hh, H3), b.Less(ww, W3))
    src = b.Where(inside, b.Add(starts, b.Add(b.Mul(hh, W3), ww)), S)  # [L,Hmax,Wmax]

    v = b.Transpose(value, perm=[0, 2, 3, 1])  # [B,M,D,S]
    v = b.Pad(v, b.const([0, 0, 0, 0, 0, 0, 0, 1]))  # [B,M,D,S+1], row S is zero
    v = b.Gather(v, b.Reshape(src, b.const([-1])), axis=3)  # [B,M,D,L*Hmax*Wmax]
    v = b.Reshape(v, b.Concat(B, M, D, L, Hmax, Wmax, axis=0))
    v = b.Transpose(v, perm=[0, 1, 3, 2, 4, 5])  # [B,M,L,D,Hmax,Wmax]
    v = b.Reshape(v, b.Concat(b.const([-1]), D, Hmax, Wmax, axis=0))

    # normalised grid with align_corners=0 on the padded size
    one = b.const(1.0, FLOAT)
    two = b.const(2.0, FLOAT)
    gx = b.Sub(b.Div(b.Add(b.Mul(x, two), one), b.to_float(Wmax)), one)
    gy = b.Sub(b.Div(b.Add(b.Mul(y, two), one), b.to_float(Hmax)), one)
    grid = b.Concat(b.Unsqueeze(gx, b.const([5])), b.Unsqueeze(gy, b.const([5])), axis=5)  # [B,Q,M,L,P,2]
    grid = b.Transpose(grid, perm=[0, 2, 3, 1, 4, 5])  # [B,M,L,Q,P,2]
    grid = b.Reshape(grid, b.Concat(b.const([-1]), Q, P, b.const([2]), axis=0))
    mode = "bilinear" if opset < 20 else "linear"
    sampled = b.GridSample(v, grid, mode=mode, padding_mode="zeros", align_corners=0)  # [B*M*L,D,Q,P]
    sampled = b.Reshape(sampled, b.Concat(B, M, L, D, Q, P, axis=0))
    wt = b.Unsqueeze(b.Transpose(w, perm=[0, 2, 3, 1, 4]), b.const([3]))  # [B,M,L,1,Q,P]
    out = b.ReduceSum(b.Mul(sampled, wt), b.const([2, 5]), keepdims=0)  # [B,M,D,Q]
    return b.Transpose(out, perm=[0, 3, 1, 2])


# ------------------------------------------------------------------------------------------------------------------
# Rotate
# ------------------------------------------------------------------------------------------------------------------


def rotate_function(opset: int) -> onnx.FunctionProto:
    """Rotate (bevformer-tiny.md §4.3) at ``opset``; ``interpolation`` 1 nearest (default), 0 bilinear."""
    _check_opset(opset, "Rotate")
    b = _Body("rot")
    img = b.to_float("img")
    shp = b.Shape(img)
    C, H, W = (b.dim(shp, i) for i in range(3))
    Hf = b.to_float(b.scalar(H))
    Wf = b.to_float(b.scalar(W))
    half = b.const(0.5, FLOAT)
    one = b.const(1.0, FLOAT)
    zero = b.const(0.0, FLOAT)
    Hh = b.Div(Hf, b.const(2.0, FLOAT))
    Wh = b.Div(Wf, b.const(2.0, FLOAT))

    theta = b.Mul(b.Reshape(b.to_float("angle"), b.const([1])), b.const(-3.141592653589793 / 180.0, FLOAT))
    cos = b.Cos(theta)
    sin = b.Sin(theta)
    center = b.to_float("center")
    cxp = b.Sub(b.Gather(center, b.const([0])), Wh)  # [1]
    cyp = b.Sub(b.Gather(center, b.const([1])), Hh)

    yy = b.Sub(b.Add(b.to_float(b.Range(b.const(0), b.scalar(H), b.const(1))), half), Hh)
    xx = b.Sub(b.Add(b.to_float(b.Range(b.const(0), b.scalar(W), b.const(1))), half), Wh)
    y = b.Unsqueeze(yy, b.const([1]))  # [H,1]
    x = b.Unsqueeze(xx, b.const([0]))  # [1,W]
    tx = b.Add(b.Sub(b.Neg(b.Mul(cxp, cos)), b.Mul(cyp, sin)), cxp)
    ty = b.Add(b.Sub(b.Mul(cxp, sin), b.Mul(cyp, cos)), cyp)
    xs = b.Add(b.Add(b.Mul(cos, x), b.Mul(sin, y)), tx)  # [H,W]
    ys = b.Add(b.Add(b.Neg(b.Mul(sin, x)), b.Mul(cos, y)), ty)
    ix = b.Sub(b.Add(xs, Wh), half)
    iy = b.Sub(b.Add(ys, Hh), half)

    flat = b.Reshape(img, b.Concat(C, b.const([-1]), axis=0))  # [C, H*W]
    Wm1 = b.Sub(Wf, one)
    Hm1 = b.Sub(Hf, one)
    Wi = b.scalar(W)

    def pick(g: _Body, yc, xc):
        """Pixels at integer-valued float coordinates, zero outside: [C, H*W]."""
        valid = g.And(
            g.And(g.GreaterOrEqual(xc, zero), g.LessOrEqual(xc, Wm1)),
            g.And(g.GreaterOrEqual(yc, zero), g.LessOrEqual(yc, Hm1)),
        )
        xi = g.Cast(g.Max(g.Min(xc, Wm1), zero), to=INT64)
        yi = g.Cast(g.Max(g.Min(yc, Hm1), zero), to=INT64)
        idx = g.Reshape(g.Add(g.Mul(yi, Wi), xi), g.const([-1]))
        mask = g.Reshape(g.Cast(valid, to=FLOAT), g.const([1, -1]))
        return g.Gather(flat, idx, axis=1), mask

    # only the branch the attribute selects runs (If on a constant that references the attribute)
    nb, nearest_graph = b.branch("nearest")
    # nearest: C's round (halves away from zero), as the fp32 plugin kernel
    rx = nb.Mul(nb.Sign(ix), nb.Floor(nb.Add(nb.Abs(ix), half)))
    ry = nb.Mul(nb.Sign(iy), nb.Floor(nb.Add(nb.Abs(iy), half)))
    pix, mask = pick(nb, ry, rx)
    nearest = nearest_graph(nb.Mul(pix, mask))

    bb, bilinear_graph = b.branch("bilinear")
    x0 = bb.Floor(ix)
    y0 = bb.Floor(iy)
    lx = bb.Reshape(bb.Sub(ix, x0), bb.const([1, -1]))
    ly = bb.Reshape(bb.Sub(iy, y0), bb.const([1, -1]))
    acc = None
    for dy, wy in ((zero, bb.Sub(one, ly)), (one, ly)):
        for dx, wx in ((zero, bb.Sub(one, lx)), (one, lx)):
            pix, mask = pick(bb, bb.Add(y0, dy), bb.Add(x0, dx))
            term = bb.Mul(pix, bb.Mul(mask, bb.Mul(wy, wx)))
            acc = term if acc is None else bb.Add(acc, term)
    bilinear = bilinear_graph(acc)

    use_nearest = b.Equal(b.attr_const("interpolation", onnx.AttributeProto.INT), b.const(1))
    out = b.Reshape(b.If(use_nearest, then_branch=nearest, else_branch=bilinear), shp)
    b.cast_back(out, "img", opset)
    b.nodes[-1].output[0] = "output"
    default = helper.make_attribute("interpolation", 1)
    return _function(
        "RotateTRT", ["img", "angle", "center"], ["output"], b, opset, attribute_protos=[default]
    )


# ------------------------------------------------------------------------------------------------------------------
# ModulatedDeformableConv2d
# ------------------------------------------------------------------------------------------------------------------


def modulated_deform_conv2d_function(opset: int) -> onnx.FunctionProto:
    """DCNv2 (mmcv semantics, see ``reference.modulated_deform_conv2d``) at ``opset``. The node must carry bias."""
    _check_opset(opset, "ModulatedDeformableConv2d")
    b = _Body("dcn")
    x = b.to_float("input")
    offset = b.to_float("offset")
    mask = b.to_float("mask")
    weight = b.to_float("weight")
    bias = b.to_float("bias")
    INTS = onnx.AttributeProto.INTS
    stride = b.to_float(b.attr_const("stride", INTS))
    padding = b.to_float(b.attr_const("padding", INTS))
    dilation = b.to_float(b.attr_const("dilation", INTS))
    groups = b.Reshape(b.attr_const("groups", onnx.AttributeProto.INT), b.const([1]))
    dgroups = b.Reshape(b.attr_const("deform_groups", onnx.AttributeProto.INT), b.const([1]))

    xs = b.Shape(x)
    N, C, H, W = (b.dim(xs, i) for i in range(4))
    ws = b.Shape(weight)
    Cout, Cg, KH, KW = (b.dim(ws, i) for i in range(4))
    os_ = b.Shape(offset)
    Ho, Wo = b.dim(os_, 2), b.dim(os_, 3)
    K = b.Mul(KH, KW)
    cpd = b.Div(C, dgroups)

    one = b.const(1.0, FLOAT)
    zero = b.const(0.0, FLOAT)
    f = b.to_float
    r = lambda n: f(b.Range(b.const(0), b.scalar(n), b.const(1)))
    sh, sw = b.Gather(stride, b.const(0)), b.Gather(stride, b.const(1))
    ph, pw = b.Gather(padding, b.const(0)), b.Gather(padding, b.const(1))
    dh, dw = b.Gather(dilation, b.const(0)), b.Gather(dilation, b.const(1))
    # tap k = i*kw + j has row offset i*dh and column offset j*dw
    ki = b.Reshape(
        b.Mul(b.Expand(b.Unsqueeze(r(KH), b.const([1])), b.Concat(KH, KW, axis=0)), dh),
        b.const([1, 1, -1, 1, 1]),
    )
    kj = b.Reshape(
        b.Mul(b.Expand(b.Unsqueeze(r(KW), b.const([0])), b.Concat(KH, KW, axis=0)), dw),
        b.const([1, 1, -1, 1, 1]),
    )
    base_y = b.Reshape(b.Sub(b.Mul(r(Ho), sh), ph), b.const([1, 1, 1, -1, 1]))
    base_x = b.Reshape(b.Sub(b.Mul(r(Wo), sw), pw), b.const([1, 1, 1, 1, -1]))
    off = b.Reshape(offset, b.Concat(N, dgroups, K, b.const([2]), Ho, Wo, axis=0))
    py = b.Add(b.Add(base_y, ki), b.Gather(off, b.const(0), axis=3))  # [N,dg,K,Ho,Wo]
    px = b.Add(b.Add(base_x, kj), b.Gather(off, b.const(1), axis=3))
    msk = b.Reshape(mask, b.Concat(N, dgroups, K, Ho, Wo, axis=0))

    Hf, Wf = f(H), f(W)
    Hm1, Wm1 = b.Sub(Hf, one), b.Sub(Wf, one)
    x0, y0 = b.Floor(px), b.Floor(py)
    lx, ly = b.Sub(px, x0), b.Sub(py, y0)

    # rows of x in [N*dg*H*W, cpd] order: row of (n, g, s) = (n*dg + g)*H*W + s
    rows = b.Reshape(
        b.Transpose(b.Reshape(x, b.Concat(N, dgroups, cpd, b.const([-1]), axis=0)), perm=[0, 1, 3, 2]),
        b.Concat(b.const([-1]), cpd, axis=0),
    )
    HW = b.Mul(H, W)
    n_idx = b.Reshape(b.Range(b.const(0), b.scalar(N), b.const(1)), b.const([-1, 1, 1, 1, 1]))
    g_idx = b.Reshape(b.Range(b.const(0), b.scalar(dgroups), b.const(1)), b.const([1, -1, 1, 1, 1]))
    base = b.Mul(b.Add(b.Mul(n_idx, dgroups), g_idx), HW)  # [N,dg,1,1,1]
    Wi = W

    cols = None
    for dy, wy in ((zero, b.Sub(one, ly)), (one, ly)):
        for dx, wx in ((zero, b.Sub(one, lx)), (one, lx)):
            cy, cx = b.Add(y0, dy), b.Add(x0, dx)
            valid = b.And(
                b.And(b.GreaterOrEqual(cx, zero), b.LessOrEqual(cx, Wm1)),
                b.And(b.GreaterOrEqual(cy, zero), b.LessOrEqual(cy, Hm1)),
            )
            xi = b.Cast(b.Max(b.Min(cx, Wm1), zero), to=INT64)
            yi = b.Cast(b.Max(b.Min(cy, Hm1), zero), to=INT64)
            idx = b.Add(base, b.Add(b.Mul(yi, Wi), xi))  # [N,dg,K,Ho,Wo]
            cw = b.Unsqueeze(b.Mul(b.Mul(wy, wx), b.Mul(b.Cast(valid, to=FLOAT), msk)), b.const([5]))
            term = b.Mul(b.Gather(rows, idx, axis=0), cw)  # [N,dg,K,Ho,Wo,cpd]
            cols = term if cols is None else b.Add(cols, term)
    cols = b.Transpose(cols, perm=[0, 1, 5, 2, 3, 4])  # [N,dg,cpd,K,Ho,Wo]
    cols = b.Reshape(cols, b.Concat(N, groups, b.Mul(Cg, K), b.const([-1]), axis=0))  # [N,g,Cg*K,Ho*Wo]
    wmat = b.Reshape(weight, b.Concat(groups, b.Div(Cout, groups), b.Mul(Cg, K), axis=0))
    out = b.Reshape(b.MatMul(wmat, cols), b.Concat(N, Cout, Ho, Wo, axis=0))
    out = b.Add(out, b.Reshape(bias, b.const([1, -1, 1, 1])))
    b.cast_back(out, "input", opset)
    b.nodes[-1].output[0] = "output"
    defaults = [
        helper.make_attribute("stride", [1, 1]),
        helper.make_attribute("padding", [0, 0]),
        helper.make_attribute("dilation", [1, 1]),
        helper.make_attribute("groups", 1),
        helper.make_attribute("deform_groups", 1),
    ]
    return _function(
        "ModulatedDeformableConv2dTRT",
        ["input", "offset", "mask", "weight", "bias"],
        ["output"],
        b,
        opset,
        attribute_protos=defaults,
    )


# ------------------------------------------------------------------------------------------------------------------
# GridSampler2D
# ------------------------------------------------------------------------------------------------------------------


def grid_sample2d_function(opset: int) -> onnx.FunctionProto:
    """GridSampler2D (grid [N,2,Ho,Wo] scaled x10) through GridSample; needs opset >= 16."""
    if opset < 16:
        raise UserError(
            f"GridSampler2DTRT: the CPU implementation uses GridSample, which needs opset 16 or later, and the "
            f"model's opset is {opset}; upgrade the model with onnx.version_converter"
        )
    b = _Body("gs")
    x = b.to_float("input")
    grid = b.Transpose(b.Div(b.to_float("grid"), b.const(10.0, FLOAT)), perm=[0, 2, 3, 1])
    INT = onnx.AttributeProto.INT
    interp = b.attr_const("interpolation_mode", INT)
    pad = b.attr_const("padding_mode", INT)
    align = b.attr_const("align_corners", INT)
    modes = ("bilinear", "nearest", "bicubic") if opset < 20 else ("linear", "nearest", "cubic")
    pads = ("zeros", "border", "reflection")

    def leaf(mode: str, padding: str, ac: int) -> onnx.GraphProto:
        out = f"gs_leaf_{mode}_{padding}_{ac}"
        node = helper.make_node(
            "GridSample", [x, grid], [out], mode=mode, padding_mode=padding, align_corners=ac
        )
        return helper.make_graph(
            [node], f"g_{mode}_{padding}_{ac}", [], [helper.make_value_info(out, onnx.TypeProto())]
        )

    def choose(selector: str, options, make_branch, depth_name: str) -> onnx.GraphProto | str:
        """Nested If over the options of one attribute; returns the output name."""
        *rest, last = options
        result_graph = make_branch(last)
        for i, opt in reversed(list(enumerate(rest))):
            cond = b.Equal(selector, b.const(i))
            name = f"gs_{depth_name}_{i}_{len(b.nodes)}"
            node = helper.make_node(
                "If", [cond], [name], then_branch=make_branch(opt), else_branch=result_graph
            )
            result_graph = helper.make_graph(
                [node], f"{name}_g", [], [helper.make_value_info(name, onnx.TypeProto())]
            )
        return result_graph

    def by_align(mode, padding):
        return choose(align, (0, 1), lambda ac: leaf(mode, padding, ac), f"ac_{mode}_{padding}")

    def by_pad(mode):
        return choose(pad, pads, lambda p: by_align(mode, p), f"pad_{mode}")

    top = choose(interp, modes, by_pad, "mode")
    # inline the outermost graph's nodes into the body
    b.nodes.extend(top.node)
    b.cast_back(top.output[0].name, "input", opset)
    b.nodes[-1].output[0] = "output"
    defaults = [helper.make_attribute(n, 0) for n in ("interpolation_mode", "padding_mode", "align_corners")]
    return _function("GridSampler2DTRT", ["input", "grid"], ["output"], b, opset, attribute_protos=defaults)
