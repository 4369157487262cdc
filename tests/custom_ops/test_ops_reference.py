"""The numpy references against independent formulations, on fresh random inputs and on the borders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from custom_ops_cases import BEVFORMER_TINY_MSDA, ODD_MSDA, msda_inputs
from qdqkit.custom_ops import reference as R


def msda_by_grid_sample(value, spatial_shapes, ref, offsets, logits):
    """MSDA written as mmcv's multi_scale_deformable_attn_pytorch with the softmax folded in (float64)."""
    value = torch.tensor(value, dtype=torch.float64)
    B, _, M, D = value.shape
    shapes = [tuple(int(v) for v in s) for s in spatial_shapes]
    L = len(shapes)
    Q = offsets.shape[1]
    P = logits.shape[-1] // L
    G = ref.shape[-1] // 2
    w = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1).view(B, Q, M, L, P)
    off = torch.tensor(offsets, dtype=torch.float64).view(B, Q, M, L, P, 2)
    r = torch.tensor(ref, dtype=torch.float64).view(B, Q, 1, G, 2)[:, :, :, [p % G for p in range(P)]]
    out = torch.zeros(B, M, D, Q, dtype=torch.float64)
    start = 0
    for lvl, (H, W) in enumerate(shapes):
        v = value[:, start : start + H * W].permute(0, 2, 3, 1).reshape(B * M, D, H, W)
        loc = r + off[:, :, :, lvl] / torch.tensor([W, H], dtype=torch.float64)
        grid = (2 * loc - 1).permute(0, 2, 1, 3, 4).reshape(B * M, Q, P, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out += (s * w[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * M, 1, Q, P)).sum(-1).view(B, M, D, Q)
        start += H * W
    return out.permute(0, 3, 1, 2).numpy()


@pytest.mark.parametrize(
    "case", list(ODD_MSDA.values()) + [BEVFORMER_TINY_MSDA["decoder"]], ids=list(ODD_MSDA) + ["decoder"]
)
@pytest.mark.parametrize("seed", [1, 2])
def test_msda_matches_grid_sample_formulation(case, seed):
    inputs = msda_inputs(case, seed=seed, spread=0.3, dtype=np.float64)
    got = R.ms_deform_attn(*inputs)
    np.testing.assert_allclose(got, msda_by_grid_sample(*inputs), atol=1e-12, rtol=0)
    assert (
        got.dtype == np.float64
        and got.shape == inputs[0].shape[:1] + inputs[3].shape[1:3] + inputs[0].shape[3:]
    )


def test_msda_border_positions():
    """Sampling exactly on and just past every border: -1 and size are outside, -0.5 and size-0.5 half inside."""
    H, W = 3, 4
    value = np.arange(H * W, dtype=np.float64).reshape(1, H * W, 1, 1) + 1.0
    xs = [-1.0, -0.999, -0.5, 0.0, W - 1.0, W - 0.5, W - 0.001, float(W), W + 0.3]
    pts = [(x, y) for x in xs for y in (-1.0, 0.0, 1.25, H - 0.5, float(H))]
    Q = len(pts)
    ref = np.zeros((1, Q, 1, 2))
    # position = ref*size + offset - 0.5, with ref = 0: offset = position + 0.5
    offsets = np.array([[x + 0.5, y + 0.5] for x, y in pts]).reshape(1, Q, 1, 2)
    logits = np.zeros((1, Q, 1, 1))
    got = R.ms_deform_attn(value, np.array([[H, W]]), ref, offsets, logits)
    np.testing.assert_allclose(got, msda_by_grid_sample(value, [[H, W]], ref, offsets, logits), atol=1e-12)
    img = value.reshape(H, W)
    by_pos = dict(zip(pts, got.reshape(-1)))
    assert by_pos[(-1.0, 0.0)] == 0 and by_pos[(float(W), 0.0)] == 0 and by_pos[(0.0, float(H))] == 0
    assert by_pos[(0.0, 0.0)] == img[0, 0] and by_pos[(W - 1.0, 1.25)] == pytest.approx(
        0.75 * img[1, -1] + 0.25 * img[2, -1]
    )
    assert by_pos[(-0.5, 0.0)] == pytest.approx(0.5 * img[0, 0])


def test_msda_softmax_counts_out_of_bounds_points():
    """A point sampled outside still takes its share of the softmax (the plugin's in-place softmax)."""
    value = np.ones((1, 4, 1, 1))
    ref = np.full((1, 1, 1, 2), 0.5)
    offsets = np.array([0.0, 0.0, 100.0, 100.0]).reshape(1, 1, 1, 4)  # point 1 far outside
    got = R.ms_deform_attn(value, np.array([[2, 2]]), ref, offsets, np.zeros((1, 1, 1, 2)))
    assert got.item() == pytest.approx(0.5)


def rotate_by_matrices(img, angle, center, interpolation):
    """Rotation about a centre as T(c) R T(-c) acting on pixel centres (w + 0.5, h + 0.5), sampled per pixel."""
    _, H, W = img.shape
    t = math.radians(angle)
    # counter-clockwise on screen (y down) maps the output pixel back through a rotation by +angle in (x, -y)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    flip = np.diag([1.0, -1.0, 1.0])
    cx, cy = center
    to_c = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]])
    from_c = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1.0]])
    inverse = from_c @ flip @ np.linalg.inv(rot) @ flip @ to_c
    out = np.zeros_like(img, dtype=np.float64)
    for h in range(H):
        for w in range(W):
            sx, sy, _ = inverse @ np.array([w + 0.5, h + 0.5, 1.0])
            fx, fy = sx - 0.5, sy - 0.5
            if interpolation == 1:
                ix, iy = math.floor(fx + 0.5), math.floor(fy + 0.5)
                if 0 <= ix < W and 0 <= iy < H:
                    out[:, h, w] = img[:, iy, ix]
            else:
                x0, y0 = math.floor(fx), math.floor(fy)
                for yy, wy in ((y0, 1 - (fy - y0)), (y0 + 1, fy - y0)):
                    for xx, wx in ((x0, 1 - (fx - x0)), (x0 + 1, fx - x0)):
                        if 0 <= xx < W and 0 <= yy < H:
                            out[:, h, w] += wy * wx * img[:, yy, xx]
    return out


@pytest.mark.parametrize("interpolation", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotate_matches_rotation_matrices(interpolation, seed):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((3, 9, 13))
    angle = float(rng.uniform(-200, 200))
    center = rng.uniform(-3, 15, 2)
    got = R.rotate(img, angle, center, interpolation)
    np.testing.assert_allclose(got, rotate_by_matrices(img, angle, center, interpolation), atol=1e-9)


@pytest.mark.parametrize("interpolation", [0, 1])
@pytest.mark.parametrize("center", [(100.0, 100.0), (0.0, 0.0), (2.3, 7.9)])
def test_rotate_angle_zero_is_identity(interpolation, center):
    img = np.random.default_rng(5).standard_normal((4, 6, 7))
    np.testing.assert_array_equal(R.rotate(img, 0.0, center, interpolation), img)


def test_rotate_quarter_turn_about_image_centre_is_rot90():
    img = np.random.default_rng(6).standard_normal((2, 5, 5))
    got = R.rotate(img, 90.0, (2.5, 2.5), 1)
    np.testing.assert_array_equal(got, np.rot90(img, k=1, axes=(1, 2)))


def test_rotate_bevformer_tiny_centre_outside_map():
    """BEVFormer-tiny rotates its 50x50 BEV about (100, 100), outside the map: most of the map leaves it."""
    img = np.random.default_rng(7).standard_normal((2, 50, 50))
    got = R.rotate(img, 30.0, (100.0, 100.0), 1)
    np.testing.assert_allclose(got, rotate_by_matrices(img, 30.0, (100.0, 100.0), 1), atol=1e-9)
    assert 0 < np.count_nonzero(got[0]) < 2500


def dcn_by_im2col(x, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
    """DCNv2 with explicit scalar loops: build the column matrix [C*K, Ho*Wo] per sample, then one GEMM per group."""
    N, C, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    Ho, Wo = offset.shape[2:]
    K = kh * kw

    def bilinear(img, y, x_):
        if not (y > -1 and x_ > -1 and y < H and x_ < W):
            return 0.0
        y0, x0 = math.floor(y), math.floor(x_)
        acc = 0.0
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x_ - x0)), (x0 + 1, x_ - x0)):
                if 0 <= yy < H and 0 <= xx < W:
                    acc += wy * wx * img[yy, xx]
        return acc

    out = np.zeros((N, Cout, Ho, Wo))
    for n in range(N):
        cols = np.zeros((C * K, Ho * Wo))
        for c in range(C):
            g = c // (C // dg)
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for ho in range(Ho):
                        for wo in range(Wo):
                            dy = offset[n, g * 2 * K + 2 * k, ho, wo]
                            dx = offset[n, g * 2 * K + 2 * k + 1, ho, wo]
                            m = mask[n, g * K + k, ho, wo]
                            y = ho * stride[0] - padding[0] + i * dilation[0] + dy
                            x_ = wo * stride[1] - padding[1] + j * dilation[1] + dx
                            cols[c * K + k, ho * Wo + wo] = m * bilinear(x[n, c], y, x_)
        opg = Cout // groups
        for grp in range(groups):
            wm = weight[grp * opg : (grp + 1) * opg].reshape(opg, Cg * K)
            out[n, grp * opg : (grp + 1) * opg] = (wm @ cols[grp * Cg * K : (grp + 1) * Cg * K]).reshape(
                opg, Ho, Wo
            )
    return out + bias.reshape(1, -1, 1, 1)


DCN_CASES = {
    "3x3-s1-p1": {
        "N": 1,
        "C": 4,
        "H": 6,
        "W": 7,
        "Cout": 3,
        "k": (3, 3),
        "stride": (1, 1),
        "padding": (1, 1),
        "dilation": (1, 1),
        "groups": 1,
        "dg": 1,
    },
    "s2-d2-g2-dg2": {
        "N": 2,
        "C": 4,
        "H": 7,
        "W": 6,
        "Cout": 6,
        "k": (3, 3),
        "stride": (2, 2),
        "padding": (2, 2),
        "dilation": (2, 2),
        "groups": 2,
        "dg": 2,
    },
    "odd-1x3": {
        "N": 1,
        "C": 3,
        "H": 5,
        "W": 5,
        "Cout": 2,
        "k": (1, 3),
        "stride": (1, 2),
        "padding": (0, 1),
        "dilation": (1, 1),
        "groups": 1,
        "dg": 3,
    },
}


def dcn_inputs(cfg, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    kh, kw = cfg["k"]
    Ho = (cfg["H"] + 2 * cfg["padding"][0] - cfg["dilation"][0] * (kh - 1) - 1) // cfg["stride"][0] + 1
    Wo = (cfg["W"] + 2 * cfg["padding"][1] - cfg["dilation"][1] * (kw - 1) - 1) // cfg["stride"][1] + 1
    K = kh * kw
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"]))
    offset = rng.normal(0, 2.0, (cfg["N"], cfg["dg"] * 2 * K, Ho, Wo))
    mask = rng.uniform(0, 1, (cfg["N"], cfg["dg"] * K, Ho, Wo))
    weight = rng.standard_normal((cfg["Cout"], cfg["C"] // cfg["groups"], kh, kw))
    bias = rng.standard_normal(cfg["Cout"])
    attrs = {
        "stride": cfg["stride"],
        "padding": cfg["padding"],
        "dilation": cfg["dilation"],
        "groups": cfg["groups"],
        "deform_groups": cfg["dg"],
    }
    return [a.astype(dtype) for a in (x, offset, mask, weight, bias)], attrs


@pytest.mark.parametrize("name", list(DCN_CASES))
def test_dcn_matches_im2col(name):
    cfg = DCN_CASES[name]
    arrays, attrs = dcn_inputs(cfg, seed=3)
    got = R.modulated_deform_conv2d(*arrays, **attrs)
    want = dcn_by_im2col(
        *arrays, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"], cfg["dg"]
    )
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_dcn_without_offsets_is_conv2d():
    cfg = DCN_CASES["s2-d2-g2-dg2"]
    (x, offset, mask, weight, bias), attrs = dcn_inputs(cfg, seed=4)
    got = R.modulated_deform_conv2d(x, np.zeros_like(offset), np.ones_like(mask), weight, bias, **attrs)
    want = F.conv2d(
        torch.tensor(x),
        torch.tensor(weight),
        torch.tensor(bias),
        stride=attrs["stride"],
        padding=attrs["padding"],
        dilation=attrs["dilation"],
        groups=attrs["groups"],
    ).numpy()
    np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("padding_mode", [0, 1, 2])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sample_matches_torch(mode, padding_mode, align_corners):
    rng = np.random.default_rng(mode * 10 + padding_mode * 2 + align_corners)
    x = rng.standard_normal((2, 3, 5, 6))
    grid = rng.uniform(-13, 13, (2, 2, 4, 7))  # the plugin's x10 scale; some points outside
    want = F.grid_sample(
        torch.tensor(x),
        torch.tensor(grid / 10).permute(0, 2, 3, 1),
        mode=("bilinear", "nearest", "bicubic")[mode],
        padding_mode=("zeros", "border", "reflection")[padding_mode],
        align_corners=bool(align_corners),
    ).numpy()
    np.testing.assert_allclose(R.grid_sample2d(x, grid, mode, padding_mode, align_corners), want, atol=1e-10)
