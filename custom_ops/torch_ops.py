"""PyTorch autograd Functions for BEVFormer's plugin ops: plain-PyTorch maths forward, upstream ONNX node on export.

Each Function's ``symbolic`` emits exactly the node DerryHub's exporter writes (op_type, default domain "",
attribute names and types, input order) and also sets the output's type and shape, so an exported model is typed
without TensorRT. The forward computes the op in plain PyTorch (no compiled extension), or calls
``qdqkit.custom_ops.cuda`` when the inputs are CUDA tensors and those kernels are available. Backward recomputes
the plain-PyTorch forward under autograd, so the ops can be trained through as well.

Export with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), which honours ``symbolic``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "GridSampler2DFunction",
    "GridSampler2DFunction2",
    "ModulatedDeformConv2dFunction",
    "ModulatedDeformConv2dFunction2",
    "MultiScaleDeformableAttnFunction",
    "MultiScaleDeformableAttnFunction2",
    "RotateFunction",
    "RotateFunction2",
    "grid_sample2d",
    "grid_sample2d_torch",
    "modulated_deform_conv2d",
    "modulated_deform_conv2d_torch",
    "ms_deform_attn",
    "ms_deform_attn_torch",
    "rotate",
    "rotate_torch",
]


# --------------------------------------------------------------------------------------------------------------
# Plain-PyTorch maths (also what the CUDA kernels are tested against on a GPU machine)
# --------------------------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp16/bf16 inputs compute in fp32: several CPU kernels (grid_sample among them) have no half version."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """MSDA maths (see ``reference.ms_deform_attn``) with ``F.grid_sample``, one call per level.

    grid_sample's zero padding already gives 0 for a position outside (-1, size), so the plugin's bounds test
    needs no separate mask.
    """
    out_dtype = value.dtype
    dt = _compute_dtype(value)
    value = value.to(dt)
    B, _, M, D = value.shape
    Q = sampling_offsets.shape[1]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.reshape(-1, 2).tolist()]
    L = len(shapes)
    P = attention_weights.shape[-1] // L
    G = reference_points.shape[-1] // 2

    weights = torch.softmax(attention_weights.to(dt).reshape(B, Q, M, L * P), dim=-1).reshape(B, Q, M, L, P)
    offsets = sampling_offsets.to(dt).reshape(B, Q, M, L, P, 2)
    groups = torch.arange(P, device=value.device) % G
    ref = reference_points.to(dt).reshape(B, Q, 1, G, 2)[:, :, :, groups]  # [B, Q, 1, P, 2]

    out = value.new_zeros((B, M, D, Q))
    start = 0
    for level, (H, W) in enumerate(shapes):
        level_value = value[:, start : start + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        # filled on the device: a tensor made from a Python list, or an element assigned a Python number, is a
        # host-to-device copy, which a CUDA graph cannot capture
        size = torch.full((2,), float(W), dtype=dt, device=value.device)
        size[1:].fill_(float(H))
        loc = ref + offsets[:, :, :, level] / size  # normalised [0, 1] positions, [B, Q, M, P, 2]
        grid = (2 * loc - 1).permute(0, 2, 1, 3, 4).reshape(B * M, Q, P, 2)
        sampled = F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        w = weights[:, :, :, level].permute(0, 2, 1, 3).reshape(B * M, 1, Q, P)
        out = out + (sampled * w).sum(-1).reshape(B, M, D, Q)
        start += H * W
    return out.permute(0, 3, 1, 2).contiguous().to(out_dtype)


def _rotate_source(
    H: int, W: int, angle: torch.Tensor, center: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source pixel coordinates (ix, iy), each [H, W], of every output pixel (bevformer-tiny.md §4.3)."""
    device = center.device
    theta = -angle.to(dtype).reshape(()) * (torch.pi / 180.0)
    cx, cy = center.to(dtype).reshape(2)
    cxp = cx - W / 2.0
    cyp = cy - H / 2.0
    cos, sin = torch.cos(theta), torch.sin(theta)
    y = torch.arange(H, dtype=dtype, device=device)[:, None] - H / 2.0 + 0.5
    x = torch.arange(W, dtype=dtype, device=device)[None, :] - W / 2.0 + 0.5
    xs = cos * x + sin * y + (-cxp * cos - cyp * sin + cxp)
    ys = -sin * x + cos * y + (cxp * sin - cyp * cos + cyp)
    return xs + W / 2.0 - 0.5, ys + H / 2.0 - 0.5


def rotate_torch(
    img: torch.Tensor, angle: torch.Tensor, center: torch.Tensor, interpolation: int = 1
) -> torch.Tensor:
    """Rotate maths (see ``reference.rotate``): nearest rounds halves away from zero as the fp32 plugin kernel."""
    out_dtype = img.dtype
    dt = _compute_dtype(img)
    src = img.to(dt)
    C, H, W = src.shape
    ix, iy = _rotate_source(H, W, torch.as_tensor(angle), torch.as_tensor(center, device=img.device), dt)
    if int(interpolation) == 1:
        rx = torch.sign(ix) * torch.floor(ix.abs() + 0.5)
        ry = torch.sign(iy) * torch.floor(iy.abs() + 0.5)
        valid = (rx >= 0) & (rx <= W - 1) & (ry >= 0) & (ry <= H - 1)
        idx = (ry.clamp(0, H - 1) * W + rx.clamp(0, W - 1)).long().reshape(-1)
        out = src.reshape(C, H * W)[:, idx].reshape(C, H, W) * valid.to(dt)
    elif int(interpolation) == 0:
        grid = torch.stack(((2 * ix + 1) / W - 1, (2 * iy + 1) / H - 1), dim=-1)[None]
        out = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    else:
        raise ValueError(f"Rotate interpolation must be 0 (bilinear) or 1 (nearest), got {interpolation}")
    return out.to(out_dtype)


def modulated_deform_conv2d_torch(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (1, 1),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    deform_groups: int = 1,
) -> torch.Tensor:
    """DCNv2 maths (see ``reference.modulated_deform_conv2d``): grid_sample per deform group, then a grouped GEMM."""
    out_dtype = x.dtype
    dt = _compute_dtype(x)
    x = x.to(dt)
    N, C, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    Ho, Wo = offset.shape[-2:]
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    K = kh * kw
    cpd = C // deform_groups
    off = offset.to(dt).reshape(N, deform_groups, K, 2, Ho, Wo)
    msk = mask.to(dt).reshape(N, deform_groups, K, Ho, Wo)

    ki = torch.arange(kh, device=x.device, dtype=dt).repeat_interleave(kw) * dh  # tap row offsets, [K]
    kj = torch.arange(kw, device=x.device, dtype=dt).repeat(kh) * dw
    base_y = torch.arange(Ho, device=x.device, dtype=dt) * sh - ph
    base_x = torch.arange(Wo, device=x.device, dtype=dt) * sw - pw
    py = (
        base_y[None, None, None, :, None] + ki[None, None, :, None, None] + off[:, :, :, 0]
    )  # [N, dg, K, Ho, Wo]
    px = base_x[None, None, None, None, :] + kj[None, None, :, None, None] + off[:, :, :, 1]
    grid = torch.stack(((2 * px + 1) / W - 1, (2 * py + 1) / H - 1), dim=-1)
    grid = grid.reshape(N * deform_groups, K * Ho, Wo, 2)
    sampled = F.grid_sample(
        x.reshape(N * deform_groups, cpd, H, W),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).reshape(N, deform_groups, cpd, K, Ho, Wo)
    cols = (sampled * msk[:, :, None]).reshape(N, groups, Cg * K, Ho * Wo)
    wmat = weight.to(dt).reshape(groups, Cout // groups, Cg * K)
    out = torch.einsum("gok,ngkp->ngop", wmat, cols).reshape(N, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.to(dt).reshape(1, Cout, 1, 1)
    return out.to(out_dtype)


def grid_sample2d_torch(
    x: torch.Tensor,
    grid: torch.Tensor,
    interpolation_mode: int = 0,
    padding_mode: int = 0,
    align_corners: int = 0,
) -> torch.Tensor:
    """GridSampler2D maths: the plugin's grid is [N,2,Hout,Wout] scaled by 10."""
    out_dtype = x.dtype
    dt = _compute_dtype(x)
    g = (grid.to(dt) / 10.0).permute(0, 2, 3, 1)
    out = torch.ops.aten.grid_sampler(
        x.to(dt), g, int(interpolation_mode), int(padding_mode), bool(align_corners)
    )
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------------------------
# autograd Functions
# --------------------------------------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    return t if len(t) == 2 else (t[0], t[0])


def _cuda_kernel(name: str, tensors: Sequence[torch.Tensor | None]) -> Callable | None:
    """The CUDA kernel ``name`` when every tensor is on a GPU and the kernels are usable, else None."""
    if not all(t is None or t.is_cuda for t in tensors):
        return None
    try:
        from qdqkit.custom_ops import cuda
    except ImportError:
        return None
    if not cuda.available():
        return None
    return getattr(cuda, name, None)


def _sizes(v) -> list[int] | None:
    try:
        sizes = v.type().sizes()
    except RuntimeError:
        return None
    return list(sizes) if sizes is not None and all(s is not None for s in sizes) else None


def _typed(out, like, sizes):
    """Give an emitted node's output the element type of ``like`` and, where known, a static shape."""
    try:
        t = like.type()
        if sizes is not None:
            t = t.with_sizes(sizes)
        out.setType(t)
    except RuntimeError:
        pass
    return out


def _recompute_backward(ctx, grads, fn, n_tensor_args):
    """Gradients by re-running the plain-PyTorch forward under autograd (saves writing backward kernels)."""
    saved = ctx.saved_tensors
    args = [
        t.detach().requires_grad_(t.is_floating_point() and ctx.needs_input_grad[i])
        for i, t in enumerate(saved)
    ]
    with torch.enable_grad():
        out = fn(*args, *ctx.extra)
    wanted = [a for a in args if a.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grads[0], allow_unused=True)) if wanted else iter(())
    result = [next(got) if a.requires_grad else None for a in args]
    return tuple(result) + (None,) * (n_tensor_args - len(args))


class MultiScaleDeformableAttnFunction(torch.autograd.Function):
    """``MultiScaleDeformableAttnTRT``: inputs value, spatial_shapes, reference_points, sampling_offsets,
    attention_weights; no attributes; output [B, Q, M, D] with value's element type."""

    OP_TYPE = "MultiScaleDeformableAttnTRT"

    @staticmethod
    def forward(ctx, value, spatial_shapes, reference_points, sampling_offsets, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, reference_points, sampling_offsets, attention_weights)
        ctx.extra = ()
        args = (value, spatial_shapes, reference_points, sampling_offsets, attention_weights)
        # spatial_shapes is usually a host constant; the CUDA wrapper uploads it once, so it does not gate the kernel
        kernel = _cuda_kernel(
            "ms_deform_attn", (value, reference_points, sampling_offsets, attention_weights)
        )
        return kernel(*args) if kernel is not None else ms_deform_attn_torch(*args)

    @staticmethod
    def backward(ctx, grad):
        return _recompute_backward(ctx, (grad,), ms_deform_attn_torch, 5)

    @classmethod
    def _emit(cls, g, value, spatial_shapes, reference_points, sampling_offsets, attention_weights):
        out = g.op(cls.OP_TYPE, value, spatial_shapes, reference_points, sampling_offsets, attention_weights)
        vs, os_ = _sizes(value), _sizes(sampling_offsets)
        sizes = [vs[0], os_[1], vs[2], vs[3]] if vs is not None and os_ is not None else None
        return _typed(out, value, sizes)

    @staticmethod
    def symbolic(g, value, spatial_shapes, reference_points, sampling_offsets, attention_weights):
        return MultiScaleDeformableAttnFunction._emit(
            g, value, spatial_shapes, reference_points, sampling_offsets, attention_weights
        )


class MultiScaleDeformableAttnFunction2(MultiScaleDeformableAttnFunction):
    """``MultiScaleDeformableAttnTRT2``: the same node as ``MultiScaleDeformableAttnTRT`` under the TRT2 name."""

    OP_TYPE = "MultiScaleDeformableAttnTRT2"

    @staticmethod
    def symbolic(g, value, spatial_shapes, reference_points, sampling_offsets, attention_weights):
        return MultiScaleDeformableAttnFunction2._emit(
            g, value, spatial_shapes, reference_points, sampling_offsets, attention_weights
        )


class RotateFunction(torch.autograd.Function):
    """``RotateTRT``: inputs img [C,H,W], angle (0-d, degrees), center [2]; int attribute ``interpolation``."""

    OP_TYPE = "RotateTRT"

    @staticmethod
    def forward(ctx, img, angle, center, interpolation):
        ctx.save_for_backward(img, angle, center)
        ctx.extra = (int(interpolation),)
        kernel = _cuda_kernel("rotate", (img, angle, center))
        if kernel is not None:
            return kernel(img, angle, center, int(interpolation))
        return rotate_torch(img, angle, center, int(interpolation))

    @staticmethod
    def backward(ctx, grad):
        return _recompute_backward(ctx, (grad,), rotate_torch, 4)

    @classmethod
    def _emit(cls, g, img, angle, center, interpolation):
        out = g.op(cls.OP_TYPE, img, angle, center, interpolation_i=int(interpolation))
        return _typed(out, img, _sizes(img))

    @staticmethod
    def symbolic(g, img, angle, center, interpolation):
        return RotateFunction._emit(g, img, angle, center, interpolation)


class RotateFunction2(RotateFunction):
    """``RotateTRT2``: the same node as ``RotateTRT`` under the TRT2 name."""

    OP_TYPE = "RotateTRT2"

    @staticmethod
    def symbolic(g, img, angle, center, interpolation):
        return RotateFunction2._emit(g, img, angle, center, interpolation)


class ModulatedDeformConv2dFunction(torch.autograd.Function):
    """``ModulatedDeformableConv2dTRT``: inputs input, offset, mask, weight[, bias]; attributes stride, padding,
    dilation (ints), groups, deform_groups (int)."""

    OP_TYPE = "ModulatedDeformableConv2dTRT"

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        ctx.has_bias = bias is not None
        tensors = (x, offset, mask, weight) + ((bias,) if bias is not None else ())
        ctx.save_for_backward(*tensors)
        ctx.extra = (stride, padding, dilation, int(groups), int(deform_groups))
        kernel = _cuda_kernel("modulated_deform_conv2d", tensors)
        fn = kernel if kernel is not None else modulated_deform_conv2d_torch
        return fn(x, offset, mask, weight, bias, stride, padding, dilation, int(groups), int(deform_groups))

    @staticmethod
    def backward(ctx, grad):
        if ctx.has_bias:
            grads = _recompute_backward(ctx, (grad,), modulated_deform_conv2d_torch, 5)
        else:

            def no_bias(x, offset, mask, weight, *extra):
                return modulated_deform_conv2d_torch(x, offset, mask, weight, None, *extra)

            grads = _recompute_backward(ctx, (grad,), no_bias, 4) + (None,)
        return grads + (None,) * 5

    @classmethod
    def _emit(cls, g, x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
        inputs = [x, offset, mask, weight]
        if bias is not None and not (hasattr(bias, "node") and bias.node().mustBeNone()):
            inputs.append(bias)
        out = g.op(
            cls.OP_TYPE,
            *inputs,
            stride_i=list(_pair(stride)),
            padding_i=list(_pair(padding)),
            dilation_i=list(_pair(dilation)),
            groups_i=int(groups),
            deform_groups_i=int(deform_groups),
        )
        xs, ws, os_ = _sizes(x), _sizes(weight), _sizes(offset)
        sizes = [xs[0], ws[0], os_[2], os_[3]] if xs and ws and os_ else None
        return _typed(out, x, sizes)

    @staticmethod
    def symbolic(g, x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
        return ModulatedDeformConv2dFunction._emit(
            g, x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups
        )


class ModulatedDeformConv2dFunction2(ModulatedDeformConv2dFunction):
    """``ModulatedDeformableConv2dTRT2``: the same node under the TRT2 name."""

    OP_TYPE = "ModulatedDeformableConv2dTRT2"

    @staticmethod
    def symbolic(g, x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
        return ModulatedDeformConv2dFunction2._emit(
            g, x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups
        )


class GridSampler2DFunction(torch.autograd.Function):
    """``GridSampler2DTRT``: inputs input [N,C,H,W], grid [N,2,Ho,Wo] (x10); int attributes interpolation_mode,
    padding_mode, align_corners."""

    OP_TYPE = "GridSampler2DTRT"

    @staticmethod
    def forward(ctx, x, grid, interpolation_mode, padding_mode, align_corners):
        ctx.save_for_backward(x, grid)
        ctx.extra = (int(interpolation_mode), int(padding_mode), int(align_corners))
        return grid_sample2d_torch(x, grid, *ctx.extra)

    @staticmethod
    def backward(ctx, grad):
        return _recompute_backward(ctx, (grad,), grid_sample2d_torch, 5)

    @classmethod
    def _emit(cls, g, x, grid, interpolation_mode, padding_mode, align_corners):
        out = g.op(
            cls.OP_TYPE,
            x,
            grid,
            interpolation_mode_i=int(interpolation_mode),
            padding_mode_i=int(padding_mode),
            align_corners_i=int(align_corners),
        )
        xs, gs = _sizes(x), _sizes(grid)
        sizes = [xs[0], xs[1], gs[2], gs[3]] if xs and gs else None
        return _typed(out, x, sizes)

    @staticmethod
    def symbolic(g, x, grid, interpolation_mode, padding_mode, align_corners):
        return GridSampler2DFunction._emit(g, x, grid, interpolation_mode, padding_mode, align_corners)


class GridSampler2DFunction2(GridSampler2DFunction):
    """``GridSampler2DTRT2``: the same node under the TRT2 name."""

    OP_TYPE = "GridSampler2DTRT2"

    @staticmethod
    def symbolic(g, x, grid, interpolation_mode, padding_mode, align_corners):
        return GridSampler2DFunction2._emit(g, x, grid, interpolation_mode, padding_mode, align_corners)


# --------------------------------------------------------------------------------------------------------------
# Wrappers (the names of the custom_ops contract)
# --------------------------------------------------------------------------------------------------------------


def _variant(variant: int, v1, v2):
    if variant == 1:
        return v1
    if variant == 2:
        return v2
    raise ValueError(f"variant must be 1 (…TRT) or 2 (…TRT2), got {variant}")


def ms_deform_attn(
    value, spatial_shapes, reference_points, sampling_offsets, attention_weights, variant: int = 2
):
    """Multi-scale deformable attention; exports as ``MultiScaleDeformableAttnTRT2`` (variant 2) or ``…TRT`` (1)."""
    fn = _variant(variant, MultiScaleDeformableAttnFunction, MultiScaleDeformableAttnFunction2)
    return fn.apply(value, spatial_shapes, reference_points, sampling_offsets, attention_weights)


def rotate(img, angle, center, interpolation: int = 1, variant: int = 2):
    """Rotate [C,H,W] by ``angle`` degrees about ``center``; exports as ``RotateTRT2`` (variant 2) or ``RotateTRT``.

    ``angle`` and ``center`` may also be Python numbers; they become tensors of the image's type.
    """
    fn = _variant(variant, RotateFunction, RotateFunction2)
    if not isinstance(angle, torch.Tensor):
        angle = torch.tensor(float(angle), dtype=img.dtype, device=img.device)
    if not isinstance(center, torch.Tensor):
        center = torch.tensor([float(c) for c in center], dtype=img.dtype, device=img.device)
    return fn.apply(img, angle, center, int(interpolation))


def modulated_deform_conv2d(
    x,
    offset,
    mask,
    weight,
    bias,
    stride=1,
    padding=1,
    dilation=1,
    groups=1,
    deform_groups=1,
    variant: int = 2,
):
    """DCNv2; exports as ``ModulatedDeformableConv2dTRT2`` (variant 2) or ``ModulatedDeformableConv2dTRT``."""
    fn = _variant(variant, ModulatedDeformConv2dFunction, ModulatedDeformConv2dFunction2)
    return fn.apply(x, offset, mask, weight, bias, stride, padding, dilation, int(groups), int(deform_groups))


def grid_sample2d(
    x, grid, interpolation_mode: int = 0, padding_mode: int = 0, align_corners: int = 0, variant: int = 2
):
    """grid_sample with the plugin layout (grid [N,2,Ho,Wo], x10); exports as ``GridSampler2DTRT2`` / ``…TRT``."""
    fn = _variant(variant, GridSampler2DFunction, GridSampler2DFunction2)
    return fn.apply(x, grid, int(interpolation_mode), int(padding_mode), int(align_corners))
