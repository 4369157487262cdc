"""ModulatedDeformableConv2d CUDA kernels (im2col + cuBLAS, and the single-kernel direct form a TensorRT plugin
embeds), fp32 and fp16, against the numpy reference, on a GPU."""

import numpy as np
import pytest

from qdqkit.custom_ops import cuda, reference
from qdqkit.custom_ops.cuda import testing as T

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(),
                                                  reason=f"CUDA kernels unavailable: {cuda.unavailable_reason()}")]

FP32_TOL = 1e-4
FP16_TOL = 2e-3

CASES = {
    # name: (N, C, H, W, OC, k, stride, padding, dilation, groups, deform_groups)
    "resnet-dcn-3x3": (2, 64, 29, 50, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    "stride2-groups": (1, 16, 17, 13, 8, (3, 3), (2, 2), (1, 1), (1, 1), 2, 2),
    "dilated-deform4": (2, 12, 11, 9, 6, (3, 3), (1, 1), (2, 2), (2, 2), 1, 4),
    "rect-kernel-nopad": (1, 5, 8, 10, 7, (1, 3), (1, 2), (0, 0), (1, 1), 1, 1),
    "one-by-one": (3, 3, 5, 4, 2, (1, 1), (1, 1), (0, 0), (1, 1), 1, 1),
}


def _torch():
    import torch

    return torch


@pytest.mark.parametrize("impl", ["im2col", "direct"])
@pytest.mark.parametrize("dtype_name,tol", [("float32", FP32_TOL), ("float16", FP16_TOL)])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype_name, tol, impl):
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    npdt = np.float32 if dtype == torch.float32 else np.float16
    N, C, H, W, OC, k, stride, padding, dilation, groups, dg = CASES[name]
    # large offsets push many taps outside the image and onto its borders
    args = [T.rounded(a, npdt) for a in T.dcn_inputs(np.random.default_rng(), N, C, H, W, OC, k, stride, padding,
                                                     dilation, groups, dg, offset_scale=3.0)]
    ref = reference.modulated_deform_conv2d(*args, stride, padding, dilation, groups, dg)
    dev = torch.device("cuda")
    out = T.poisoned(ref.shape, dtype, dev)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 figure is for fp32 GEMM, not tf32
    try:
        cuda.modulated_deform_conv2d(*(torch.tensor(a, dtype=dtype, device=dev) for a in args), stride, padding,
                                     dilation, groups, dg, out=out, impl=impl)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any(), "kernel left output elements unwritten"
    err = T.rel_err(got, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol}"


def test_integer_offsets_hit_pixels_exactly():
    """Zero offsets and unit mask make DCN an ordinary convolution: compare with torch's conv2d."""
    torch = _torch()
    dev = torch.device("cuda")
    x = torch.randn(2, 8, 10, 12, device=dev, dtype=torch.float64).float()
    w = torch.randn(4, 8, 3, 3, device=dev)
    b = torch.randn(4, device=dev)
    off = torch.zeros(2, 18, 10, 12, device=dev)
    mask = torch.ones(2, 9, 10, 12, device=dev)
    expect = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
    for impl in ("im2col", "direct"):
        got = cuda.modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 1, 1, impl=impl)
        assert T.rel_err(got.double().cpu().numpy(), expect.cpu().numpy()) < FP32_TOL


def test_wrong_offset_shape_is_refused():
    torch = _torch()
    dev = torch.device("cuda")
    with pytest.raises(ValueError, match="offset must be"):
        cuda.modulated_deform_conv2d(torch.randn(1, 4, 5, 5, device=dev), torch.randn(1, 9, 5, 5, device=dev),
                                     torch.randn(1, 9, 5, 5, device=dev), torch.randn(2, 4, 3, 3, device=dev),
                                     torch.randn(2, device=dev))
