"""Input generators and checks shared by the GPU tests and benchmarks of the CUDA kernels.

numpy only at import time; torch is imported by the helpers that need it. Inputs are drawn fresh from a seeded
generator per call, never zeros, and built so that a share of the sampling points falls out of bounds and onto
the borders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

# MultiScaleDeformableAttn calls of BEVFormer-tiny (bevformer-tiny.md §4.2): name -> (B, S-shapes, M, D, Q, P, G)
BEVFORMER_TINY_MSDA: Dict[str, Tuple[int, List[Tuple[int, int]], int, int, int, int, int]] = {
    "tsa": (2, [(50, 50)], 8, 32, 2500, 4, 1),
    "sca": (6, [(15, 25)], 8, 32, 2500, 8, 4),
    "decoder": (1, [(50, 50)], 8, 32, 900, 4, 1),
}

# Rotate of the previous BEV: img [256, 50, 50], centre (100, 100), nearest.
BEVFORMER_TINY_ROTATE = (256, 50, 50)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf so that it never passes."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (den if den > 0 else 1.0))


@dataclass
class MsdaInputs:
    """numpy float64 copies of one MSDA input set (already rounded to the kernel's dtype)."""

    value: np.ndarray
    spatial_shapes: np.ndarray
    reference_points: np.ndarray
    sampling_offsets: np.ndarray
    attention_weights: np.ndarray

    def as_tuple(self):
        return (self.value, self.spatial_shapes, self.reference_points, self.sampling_offsets,
                self.attention_weights)


def msda_inputs(rng: np.random.Generator, B: int, shapes, M: int, D: int, Q: int, P: int, G: int,
                offset_scale: float = 3.0, border: bool = False) -> MsdaInputs:
    """Random MSDA inputs. Reference points are uniform on [-0.1, 1.1] and offsets a few pixels, so some points
    land outside the map. With ``border=True`` reference points are 0 and offsets come from a set of exact
    values on and around the edges (-1, -0.5, 0, W-1, W-0.5, W, ...), which the kernel must treat exactly as
    the reference does.
    """
    shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    L = shapes.shape[0]
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = rng.standard_normal((B, S, M, D))
    logits = rng.standard_normal((B, Q, M, L * P)) * 2.0
    if not border:
        ref = rng.uniform(-0.1, 1.1, (B, Q, 1, 2 * G))
        off = rng.standard_normal((B, Q, M, L * P * 2)) * offset_scale
    else:
        ref = np.zeros((B, Q, 1, 2 * G))
        off = np.empty((B, Q, M, L, P, 2))
        for lvl, (H, W) in enumerate(shapes):
            for axis, size in ((0, W), (1, H)):
                # offset o puts the sample at o - 0.5: these cover outside, on and inside both edges
                cand = np.array([-1.0, -0.5, -0.25, 0.0, 0.5, 1.0, size - 1.0, size - 0.5, size, size + 0.5,
                                 size / 2.0, 0.75])
                off[:, :, :, lvl, :, axis] = rng.choice(cand, size=(B, Q, M, P))
        off = off.reshape(B, Q, M, L * P * 2)
    return MsdaInputs(value, shapes, ref, off, logits)


@dataclass
class MsdaInt8Case:
    """One INT8 MSDA input set as the TensorRT plugin takes it, with what the output must be.

    value, offsets and weights are int8 with per-tensor scales (real = scale * int8); reference points fp32;
    ``expected`` is the float64 reference on the dequantised inputs, quantised with ``out_scale``.
    """

    value: np.ndarray
    spatial_shapes: np.ndarray
    reference_points: np.ndarray
    sampling_offsets: np.ndarray
    attention_weights: np.ndarray
    scales: Tuple[float, float, float, float]  # value, offsets, weights, output
    reference: np.ndarray
    expected: np.ndarray

    def check(self, got_int8) -> None:
        """The kernel's int8 output: off by one step at most (where fp32 and float64 round a near-tie
        differently), exact for almost every element, and no worse than exact rounding of the reference."""
        got = np.asarray(got_int8, dtype=np.float64)
        diff = np.abs(got - self.expected)
        assert diff.max() <= 1, f"int8 output off by {diff.max()} steps"
        assert (diff == 0).mean() > 0.999, f"only {(diff == 0).mean():.4%} of int8 outputs exact"
        sout = self.scales[3]
        assert rel_err(got * sout, self.reference) <= 1.01 * rel_err(self.expected * sout, self.reference)


def quantize_int8(a: np.ndarray) -> Tuple[np.ndarray, float]:
    """``a`` quantised per tensor to int8 (scale = max |a| / 127, round half to even): (values, scale)."""
    scale = float(np.abs(a).max()) / 127.0
    return np.clip(np.rint(a / scale), -128, 127).astype(np.int8), scale


def msda_int8_case(rng: np.random.Generator, B: int, shapes, M: int, D: int, Q: int, P: int,
                   G: int, border: bool = False) -> MsdaInt8Case:
    """Random MSDA inputs quantised per tensor to int8 (scale = max |x| / 127), with the expected output. With
    ``border`` the offsets come from :func:`msda_inputs`' border set, quantised with a power-of-two scale (0.25 for
    maps up to 31 wide), so that the dequantised offsets are exact in fp32 and points land on and around the edges."""
    raw = msda_inputs(rng, B, shapes, M, D, Q, P, G, border=border)
    qv, sv = quantize_int8(raw.value)
    if border:
        so = 2.0 ** np.ceil(np.log2(np.abs(raw.sampling_offsets).max() / 127.0))
        qo = np.clip(np.rint(raw.sampling_offsets / so), -128, 127).astype(np.int8)
    else:
        qo, so = quantize_int8(raw.sampling_offsets)
    qa, sa = quantize_int8(raw.attention_weights)
    ref32 = rounded(raw.reference_points, np.float32)
    from qdqkit.custom_ops import reference

    ref = reference.ms_deform_attn(qv * sv, raw.spatial_shapes, ref32, qo * so, qa * sa)
    sout = float(np.abs(ref).max()) / 127.0
    expected = np.clip(np.rint(ref / sout), -128, 127)
    return MsdaInt8Case(qv, raw.spatial_shapes, ref32, qo, qa, (sv, so, sa, sout), ref, expected)


def rounded(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` rounded to ``dtype`` (numpy float32 or float16) and returned as float64."""
    return np.asarray(a).astype(dtype).astype(np.float64)


def rotate_ambiguous(H: int, W: int, angle: float, center, tol: float = 1e-3) -> np.ndarray:
    """[H, W] mask of output pixels whose nearest-mode source coordinate lies within ``tol`` of a rounding
    boundary (x.5): there fp32 and float64 may pick different pixels, and neither is wrong.
    """
    theta = -float(angle) * np.pi / 180.0
    cx, cy = (float(c) for c in center)
    cxp, cyp = cx - W / 2.0, cy - H / 2.0
    cos, sin = np.cos(theta), np.sin(theta)
    h, w = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    x = w - W / 2.0 + 0.5 - cxp
    y = h - H / 2.0 + 0.5 - cyp
    ix = cos * x + sin * y + cxp + W / 2.0 - 0.5
    iy = -sin * x + cos * y + cyp + H / 2.0 - 0.5
    near = lambda v: np.abs(np.abs(v - np.floor(v)) - 0.5) < tol  # noqa: E731
    return near(ix) | near(iy)


def dcn_inputs(rng: np.random.Generator, N: int, C: int, H: int, W: int, OC: int, k: Tuple[int, int],
               stride, padding, dilation, groups: int, deform_groups: int, offset_scale: float = 2.0):
    """Random DCNv2 inputs (x, offset, mask, weight, bias) with the output size the arguments imply."""
    kh, kw = k
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    Ho = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    x = rng.standard_normal((N, C, H, W))
    offset = rng.standard_normal((N, 2 * deform_groups * kh * kw, Ho, Wo)) * offset_scale
    mask = 1.0 / (1.0 + np.exp(-rng.standard_normal((N, deform_groups * kh * kw, Ho, Wo))))
    weight = rng.standard_normal((OC, C // groups, kh, kw)) / np.sqrt(C // groups * kh * kw)
    bias = rng.standard_normal((OC,))
    return x, offset, mask, weight, bias


def poisoned(shape, dtype, device):
    """A torch tensor filled with NaN (every element a kernel forgets to write stays NaN)."""
    import torch

    return torch.full(shape, float("nan"), dtype=dtype, device=device)
