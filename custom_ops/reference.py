"""Numpy references for BEVFormer's TensorRT plugin ops, written for clarity rather than speed.

Every function accumulates in float64 and returns a float64 array. They follow the plugin kernels (DerryHub's
BEVFormer_tensorrt, ``TensorRT/plugin``) where those differ from a textbook formulation; each docstring names the
points that matter. Everything else in ``qdqkit.custom_ops`` (the ONNX functions that onnxruntime runs, the
PyTorch forward, the CUDA kernels) is tested against these.
"""

from __future__ import annotations

import numpy as np

__all__ = ["grid_sample2d", "modulated_deform_conv2d", "ms_deform_attn", "rotate", "softmax"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64 (the maximum is subtracted first, as the plugin does)."""
    a = np.asarray(logits, dtype=np.float64)
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _bilinear_gather(size: tuple[int, int], x: np.ndarray, y: np.ndarray, fetch) -> np.ndarray:
    """Bilinear interpolation at pixel coordinates (x, y) with zero padding.

    ``fetch(yy, xx)`` returns the pixels at integer indices that are already clipped into the image; a corner
    outside the image contributes 0 (its weight is masked), which is the plugins' and grid_sample's "zeros"
    padding. The result has the shape of ``fetch``'s output.
    """
    H, W = size
    x0 = np.floor(x)
    y0 = np.floor(y)
    lx = x - x0
    ly = y - y0
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    out = None
    for dy, dx, wgt in (
        (0, 0, (1 - ly) * (1 - lx)),
        (0, 1, (1 - ly) * lx),
        (1, 0, ly * (1 - lx)),
        (1, 1, ly * lx),
    ):
        yy = y0 + dy
        xx = x0 + dx
        valid = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        pix = fetch(np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1))
        term = pix * (wgt * valid)[..., None]
        out = term if out is None else out + term
    return out


def ms_deform_attn(
    value: np.ndarray,
    spatial_shapes: np.ndarray,
    reference_points: np.ndarray,
    sampling_offsets: np.ndarray,
    attention_weights: np.ndarray,
) -> np.ndarray:
    """Multi-scale deformable attention as ``MultiScaleDeformableAttnTRT(2)`` computes it.

    Shapes: value [B,S,M,D] with S = sum of H_l*W_l; spatial_shapes int [L,2] rows (H_l, W_l); reference_points
    [B,Q,1,2G]; sampling_offsets [B,Q,M,L*P*2] in pixels of each level, ordered [level][point][x,y];
    attention_weights [B,Q,M,L*P] logits. Output [B,Q,M,D].

    The softmax runs over all L*P logits of one (b, q, m), out-of-bounds points included. Point p of every level
    uses reference group g = p mod G, shared by all heads. The sampling position is ``ref*size + offset - 0.5``
    in pixels; a position outside (-1, size) contributes nothing, and each bilinear corner outside the image
    contributes zero.
    """
    value = np.asarray(value, dtype=np.float64)
    shapes = np.asarray(spatial_shapes).astype(np.int64).reshape(-1, 2)
    ref = np.asarray(reference_points, dtype=np.float64)
    B, _, M, D = value.shape
    L = shapes.shape[0]
    Q = sampling_offsets.shape[1]
    P = attention_weights.shape[-1] // L
    G = ref.shape[-1] // 2
    offsets = np.asarray(sampling_offsets, dtype=np.float64).reshape(B, Q, M, L, P, 2)
    weights = softmax(np.asarray(attention_weights).reshape(B, Q, M, L * P)).reshape(B, Q, M, L, P)

    b_idx = np.arange(B)[:, None, None]
    m_idx = np.arange(M)[None, None, :]
    out = np.zeros((B, Q, M, D), dtype=np.float64)
    start = 0
    for level, (H, W) in enumerate(shapes):
        level_value = value[:, start : start + H * W]  # [B, H*W, M, D]

        def fetch(yy, xx, level_value=level_value, W=W):
            return level_value[b_idx, yy * W + xx, m_idx]  # [B, Q, M, D]

        for p in range(P):
            g = p % G
            x = ref[:, :, 0, 2 * g][:, :, None] * W + offsets[:, :, :, level, p, 0] - 0.5
            y = ref[:, :, 0, 2 * g + 1][:, :, None] * H + offsets[:, :, :, level, p, 1] - 0.5
            inside = (y > -1) & (x > -1) & (y < H) & (x < W)
            sample = _bilinear_gather((H, W), x, y, fetch)
            out += sample * (weights[:, :, :, level, p] * inside)[..., None]
        start += H * W
    return out


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's ``round``: halves go away from zero (the fp32 Rotate kernel uses it; numpy's rint goes to even)."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def rotate(img: np.ndarray, angle, center, interpolation: int = 1) -> np.ndarray:
    """Rotate ``img`` [C,H,W] by ``angle`` degrees counter-clockwise about ``center`` (x, y), as ``RotateTRT(2)``.

    The same mapping as torchvision's ``rotate(img, angle, center, fill=0)``: for output pixel (h, w) the source
    position is the inverse rotation of the pixel centre, read with grid_sample conventions (align_corners=False).
    ``interpolation`` 1 (nearest) copies the pixel at the rounded source position (halves away from zero, as the
    fp32 kernel) or 0 outside the image; 0 (bilinear) interpolates with zero padding.
    """
    img = np.asarray(img, dtype=np.float64)
    _, H, W = img.shape
    theta = -float(np.asarray(angle, dtype=np.float64)) * np.pi / 180.0
    cx, cy = (float(c) for c in np.asarray(center, dtype=np.float64).reshape(2))
    cxp = cx - W / 2.0
    cyp = cy - H / 2.0
    cos, sin = np.cos(theta), np.sin(theta)

    h, w = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    x = w - W / 2.0 + 0.5
    y = h - H / 2.0 + 0.5
    xs = cos * x + sin * y + (-cxp * cos - cyp * sin + cxp)
    ys = -sin * x + cos * y + (cxp * sin - cyp * cos + cyp)
    ix = xs + W / 2.0 - 0.5
    iy = ys + H / 2.0 - 0.5

    chw_last = np.moveaxis(img, 0, -1)  # [H, W, C] so that fetch returns [..., C]

    if int(interpolation) == 1:
        rx = _round_half_away(ix).astype(np.int64)
        ry = _round_half_away(iy).astype(np.int64)
        valid = (rx >= 0) & (rx < W) & (ry >= 0) & (ry < H)
        out = chw_last[np.clip(ry, 0, H - 1), np.clip(rx, 0, W - 1)] * valid[..., None]
    elif int(interpolation) == 0:
        out = _bilinear_gather((H, W), ix, iy, lambda yy, xx: chw_last[yy, xx])
    else:
        raise ValueError(f"Rotate interpolation must be 0 (bilinear) or 1 (nearest), got {interpolation}")
    return np.moveaxis(out, -1, 0)


def modulated_deform_conv2d(
    x: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    groups: int = 1,
    deform_groups: int = 1,
) -> np.ndarray:
    """Modulated deformable convolution (DCNv2) as mmcv's ``ModulatedDeformConv2d`` and ``ModulatedDeformableConv2dTRT``.

    Shapes: x [N,C,H,W]; offset [N, deform_groups*2*kh*kw, Ho, Wo], for each deform group and kernel position
    k = i*kw + j the pair (dy, dx); mask [N, deform_groups*kh*kw, Ho, Wo] (already sigmoid-ed by the caller);
    weight [Cout, C/groups, kh, kw]; bias [Cout] or None. Input channel c belongs to deform group
    c // (C/deform_groups). Kernel tap (i, j) of output (ho, wo) samples at
    ``(ho*stride - pad + i*dilation + dy, wo*stride - pad + j*dilation + dx)``; a position outside (-1, size) gives
    0, otherwise bilinear with zero corners; the sample is multiplied by the mask.
    """
    x = np.asarray(x, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    N, C, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    Ho, Wo = offset.shape[2], offset.shape[3]
    K = kh * kw
    cpd = C // deform_groups
    offset = offset.reshape(N, deform_groups, K, 2, Ho, Wo)
    mask = mask.reshape(N, deform_groups, K, Ho, Wo)

    base_y = (np.arange(Ho) * sh - ph)[:, None].astype(np.float64)
    base_x = (np.arange(Wo) * sw - pw)[None, :].astype(np.float64)
    # columns[n, c, k, ho, wo]: the modulated sample each weight tap multiplies (an im2col with moving taps).
    columns = np.zeros((N, C, K, Ho, Wo), dtype=np.float64)
    for n in range(N):
        for dg in range(deform_groups):
            chans = x[n, dg * cpd : (dg + 1) * cpd]  # [cpd, H, W]
            hwc = np.moveaxis(chans, 0, -1)
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    py = base_y + i * dh + offset[n, dg, k, 0]
                    px = base_x + j * dw + offset[n, dg, k, 1]
                    inside = (py > -1) & (px > -1) & (py < H) & (px < W)
                    sample = _bilinear_gather(
                        (H, W), px, py, lambda yy, xx, hwc=hwc: hwc[yy, xx]
                    )  # [Ho, Wo, cpd]
                    sample *= (mask[n, dg, k] * inside)[..., None]
                    columns[n, dg * cpd : (dg + 1) * cpd, k] = np.moveaxis(sample, -1, 0)

    out = np.zeros((N, Cout, Ho, Wo), dtype=np.float64)
    opg = Cout // groups
    for grp in range(groups):
        cols = columns[:, grp * Cg : (grp + 1) * Cg].reshape(N, Cg * K, Ho * Wo)
        wmat = weight[grp * opg : (grp + 1) * opg].reshape(opg, Cg * K)
        out[:, grp * opg : (grp + 1) * opg] = np.einsum("ok,nkp->nop", wmat, cols).reshape(N, opg, Ho, Wo)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(1, Cout, 1, 1)
    return out


def _reflect(coord: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect coordinates into [lo, hi] (PyTorch's ``reflect_coordinates`` on the doubled bounds)."""
    if hi <= lo:
        return np.zeros_like(coord)
    span = hi - lo
    c = np.abs(coord - lo)
    flips = np.floor(c / span)
    extra = c - flips * span
    return np.where(flips % 2 == 0, extra + lo, span - extra + lo)


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    """Keys' cubic convolution weights with A = -0.75 (PyTorch's bicubic) for taps at -1, 0, 1, 2."""
    A = -0.75

    def near(v):  # |v| <= 1
        return ((A + 2) * v - (A + 3)) * v * v + 1

    def far(v):  # 1 < |v| < 2
        return ((A * v - 5 * A) * v + 8 * A) * v - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def grid_sample2d(
    x: np.ndarray,
    grid: np.ndarray,
    interpolation_mode: int = 0,
    padding_mode: int = 0,
    align_corners: int = 0,
) -> np.ndarray:
    """``GridSampler2DTRT(2)``: PyTorch's grid_sample with the plugin's grid layout.

    x [N,C,Hin,Win]; grid [N,2,Hout,Wout], channel-first (channel 0 is x along width, channel 1 is y) and scaled
    by 10, so [-10, 10] spans the input. interpolation_mode 0 bilinear, 1 nearest (half to even, as PyTorch),
    2 bicubic; padding_mode 0 zeros, 1 border, 2 reflection; align_corners 0/1. Output [N,C,Hout,Wout].
    """
    x = np.asarray(x, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64) / 10.0
    N, _, H, W = x.shape
    gx, gy = g[:, 0], g[:, 1]  # [N, Ho, Wo]
    if align_corners:
        ix = (gx + 1) / 2 * (W - 1)
        iy = (gy + 1) / 2 * (H - 1)
    else:
        ix = ((gx + 1) * W - 1) / 2
        iy = ((gy + 1) * H - 1) / 2

    def pad_coord(c, size):
        if padding_mode == 1:
            return np.clip(c, 0, size - 1)
        if padding_mode == 2:
            c = _reflect(c, 0, size - 1) if align_corners else _reflect(c, -0.5, size - 0.5)
            return np.clip(c, 0, size - 1)
        return c

    if interpolation_mode != 2:
        ix = pad_coord(ix, W)
        iy = pad_coord(iy, H)

    nhwc = np.moveaxis(x, 1, -1)  # [N, H, W, C]
    n_idx = np.arange(N)[:, None, None]

    def fetch(yy, xx):
        return nhwc[n_idx, yy, xx]  # [N, Ho, Wo, C]

    def tap(yy, xx):
        """Pixel at integer (yy, xx) after padding; zero outside for zeros padding."""
        if padding_mode == 0:
            valid = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
            return fetch(np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)) * valid[..., None]
        if padding_mode == 1:
            return fetch(np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1))
        # reflection: the tap index itself is reflected, as PyTorch's bicubic does
        ry = _reflect(yy.astype(np.float64), 0, H - 1) if align_corners else _reflect(yy + 0.0, -0.5, H - 0.5)
        rx = _reflect(xx.astype(np.float64), 0, W - 1) if align_corners else _reflect(xx + 0.0, -0.5, W - 0.5)
        ry = np.clip(ry, 0, H - 1).astype(np.int64)
        rx = np.clip(rx, 0, W - 1).astype(np.int64)
        return fetch(ry, rx)

    if interpolation_mode == 0:
        out = _bilinear_gather((H, W), ix, iy, fetch)
    elif interpolation_mode == 1:
        rx = np.rint(ix).astype(np.int64)
        ry = np.rint(iy).astype(np.int64)
        valid = (rx >= 0) & (rx < W) & (ry >= 0) & (ry < H)
        out = fetch(np.clip(ry, 0, H - 1), np.clip(rx, 0, W - 1)) * valid[..., None]
    elif interpolation_mode == 2:
        x0 = np.floor(ix)
        y0 = np.floor(iy)
        wx = _cubic_weights(ix - x0)
        wy = _cubic_weights(iy - y0)
        x0 = x0.astype(np.int64)
        y0 = y0.astype(np.int64)
        out = 0.0
        for a in range(4):
            for b in range(4):
                out = out + tap(y0 - 1 + a, x0 - 1 + b) * (wy[a] * wx[b])[..., None]
    else:
        raise ValueError(f"GridSampler interpolation_mode must be 0, 1 or 2, got {interpolation_mode}")
    return np.moveaxis(out, -1, 1)
