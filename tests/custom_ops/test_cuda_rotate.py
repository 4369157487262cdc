"""Rotate CUDA kernels (fp32, fp16; nearest and bilinear) against the numpy reference, on a GPU.

Nearest mode compares every pixel except those whose float64 source coordinate sits within 1e-3 of a rounding
boundary (there fp32 and float64 may legitimately pick neighbouring pixels); the test asserts that such pixels
are rare. Bilinear compares everything.
"""

import numpy as np
import pytest

from qdqkit.custom_ops import cuda, reference
from qdqkit.custom_ops.cuda import testing as T

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(),
                                                  reason=f"CUDA kernels unavailable: {cuda.unavailable_reason()}")]

FP32_TOL = 1e-4  # coordinates near 100 px carry ~1e-5 px of fp32 rounding into the interpolation
FP16_TOL = 2e-3

SHAPES = {
    "tiny-prev-bev": T.BEVFORMER_TINY_ROTATE,
    "odd-3x7x13": (3, 7, 13),
    "one-pixel": (1, 1, 1),
    "channels-not-multiple-of-8": (17, 31, 8),
    "wide": (5, 4, 257),
}


def _torch():
    import torch

    return torch


def _case(shape, dtype, mode, angle, center):
    torch = _torch()
    dev = torch.device("cuda")
    npdt = np.float32 if dtype == torch.float32 else np.float16
    C, H, W = shape
    img = T.rounded(np.random.default_rng().standard_normal(shape), npdt)
    angle = float(np.asarray(angle, dtype=npdt))
    center = T.rounded(np.asarray(center, dtype=np.float64), npdt)
    out = T.poisoned(shape, dtype, dev)
    cuda.rotate(torch.tensor(img, dtype=dtype, device=dev), torch.tensor(angle, dtype=dtype, device=dev),
                torch.tensor(center, dtype=dtype, device=dev), mode, out=out)
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any(), "kernel left output elements unwritten"
    ref = reference.rotate(img, angle, center, mode)
    if mode == 1:
        amb = T.rotate_ambiguous(H, W, angle, center, tol=1e-4)
        # at multiples of 90 degrees a centre on a quarter-pixel grid gives exact x.5 ties on every pixel, which
        # float64 trig (cos(pi/2) != 0) splits at random; elsewhere ties must be rare
        if H * W >= 64 and angle % 90 != 0:
            assert amb.mean() < 0.05, f"{amb.mean():.2%} of pixels near a rounding boundary"
        got, ref = got[:, ~amb], ref[:, ~amb]
    return T.rel_err(got, ref)


@pytest.mark.parametrize("mode", [1, 0], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("dtype_name,tol", [("float32", FP32_TOL), ("float16", FP16_TOL)])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(name, dtype_name, tol, mode):
    rng = np.random.default_rng()
    C, H, W = SHAPES[name]
    for angle, center in [
        (rng.uniform(-180, 180), rng.uniform(-0.5, 1.5, 2) * (W, H)),  # centre may lie outside the image
        (rng.uniform(-5, 5), (100.0, 100.0)),  # BEVFormer-tiny: small yaw step, centre outside the 50x50 map
        (90.0, (W / 2 + 0.25, H / 2 - 0.375)),  # off the centre: no exact x.5 ties that float64 trig would split
        (-180.0, rng.uniform(0, 1, 2) * (W, H)),
    ]:
        err = _case(SHAPES[name], getattr(_torch(), dtype_name), mode, angle, center)
        assert err < tol, f"angle {angle}: relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_zero_angle_is_identity(dtype_name):
    torch = _torch()
    dev = torch.device("cuda")
    img = torch.randn(T.BEVFORMER_TINY_ROTATE, device=dev).to(getattr(torch, dtype_name))
    for mode in (0, 1):
        out = cuda.rotate(img, torch.tensor(0.0, device=dev), torch.tensor([100.0, 100.0], device=dev), mode)
        assert torch.equal(out, img)


def test_python_numbers_for_angle_and_center():
    torch = _torch()
    img = np.random.default_rng().standard_normal((4, 9, 6)).astype(np.float32)
    out = cuda.rotate(torch.tensor(img, device="cuda"), 33.0, (2.0, 7.5), 0)
    assert T.rel_err(out.cpu().numpy(), reference.rotate(img, 33.0, (2.0, 7.5), 0)) < FP32_TOL


def test_bad_interpolation_is_refused():
    torch = _torch()
    with pytest.raises(ValueError, match="interpolation"):
        cuda.rotate(torch.randn(2, 3, 3, device="cuda"), 1.0, (1.0, 1.0), 2)
