"""MultiScaleDeformableAttn CUDA kernels against the numpy reference, on a GPU.

Fresh random inputs per case, output poisoned with NaN before the run, every BEVFormer-tiny shape plus odd ones
(several levels, odd and small channel counts, P a multiple of G > 1, misaligned storage), out-of-bounds and
exact border sampling. fp32 must land far under 1e-3 relative L2 error, fp16 near 1e-3.
"""

import numpy as np
import pytest

from qdqkit.custom_ops import cuda, reference
from qdqkit.custom_ops.cuda import testing as T

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(),
                                                  reason=f"CUDA kernels unavailable: {cuda.unavailable_reason()}")]

FP32_TOL = 1e-4  # coordinates near 100 px carry ~1e-5 px of fp32 rounding into the interpolation
FP16_TOL = 2e-3

ODD_CASES = {
    # name: (B, shapes, M, D, Q, P, G)
    "three-levels-D12": (2, [(7, 5), (3, 11), (1, 1)], 3, 12, 37, 6, 3),
    "odd-D3": (1, [(4, 9), (2, 3)], 2, 3, 19, 4, 2),
    "even-D6": (3, [(6, 6)], 5, 6, 11, 2, 1),
    "D16-G2": (1, [(9, 13), (5, 7)], 4, 16, 64, 4, 2),
    "one-pixel": (2, [(1, 1)], 1, 8, 5, 3, 1),
    "single-level-P8-G2": (2, [(9, 13)], 4, 16, 50, 8, 2),  # the compile-time-LP kernels with G > 1
    # the cooperative D = 32 kernels with a last warp only partly filled (its idle lanes still shuffle)
    "D32-tail-P8-G4": (1, [(9, 13)], 3, 32, 37, 8, 4),
    "D32-tail-P4": (2, [(5, 7)], 3, 32, 21, 4, 1),
    # the packed form's workspace at its extremes: a one-row map (every point on a border row), a single pixel
    "D32-one-row-P8-G2": (2, [(1, 7)], 5, 32, 29, 8, 2),
    "D32-one-pixel-P4": (3, [(1, 1)], 2, 32, 13, 4, 1),
}
ALL_CASES = {**{f"tiny-{k}": v for k, v in T.BEVFORMER_TINY_MSDA.items()}, **ODD_CASES}


def _torch():
    import torch

    return torch


def _forms(strategy):
    """(strategy, _coop, _packed) for a test strategy: "lanes" is the global form with the per-lane kernels that the
    cooperative D = 32 kernels replace (kept for other D and as the reference point of the benchmarks); "coop" the
    cooperative kernels forced; "packed" the packed form forced (fp16 and int8 with D = 32, one level, 4 or 8
    points; any other call falls back to the cooperative or per-lane kernels)."""
    return {"lanes": ("global", False, False), "coop": ("global", True, False),
            "packed": ("global", None, True)}.get(strategy, (strategy, None, None))


def _run(inp: T.MsdaInputs, dtype, out_shape, strategy="auto"):
    torch = _torch()
    dev = torch.device("cuda")
    t = lambda a: torch.tensor(a, dtype=dtype, device=dev)  # noqa: E731
    out = T.poisoned(out_shape, dtype, dev)
    form, coop, packed = _forms(strategy)
    res = cuda.ms_deform_attn(t(inp.value), torch.tensor(inp.spatial_shapes, device=dev), t(inp.reference_points),
                              t(inp.sampling_offsets), t(inp.attention_weights), out=out, strategy=form,
                              _coop=coop, _packed=packed)
    assert res.data_ptr() == out.data_ptr()
    torch.cuda.synchronize()
    return out.double().cpu().numpy()


def _check(case, dtype, tol, border=False, seed=None, strategy="auto"):
    torch = _torch()
    B, shapes, M, D, Q, P, G = case
    rng = np.random.default_rng(seed)
    raw = T.msda_inputs(rng, B, shapes, M, D, Q, P, G, border=border)
    npdt = np.float32 if dtype == torch.float32 else np.float16
    inp = T.MsdaInputs(*(T.rounded(a, npdt) if a.dtype.kind == "f" else a for a in raw.as_tuple()))
    if strategy == "smem" and sum(h * w for h, w in shapes) * D * (4 if dtype == torch.float32 else 2) > 200 * 1024:
        pytest.skip("value slice too large for shared memory")
    got = _run(inp, dtype, (B, Q, M, D), strategy)
    assert not np.isnan(got).any(), "kernel left output elements unwritten"
    ref = reference.ms_deform_attn(*inp.as_tuple())
    err = T.rel_err(got, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol}"
    return err


STRATEGIES = ["auto", "global", "smem", "lanes", "coop", "packed"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(ALL_CASES))
def test_fp32_matches_reference(name, strategy):
    _check(ALL_CASES[name], _torch().float32, FP32_TOL, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(ALL_CASES))
def test_fp16_matches_reference(name, strategy):
    _check(ALL_CASES[name], _torch().float16, FP16_TOL, strategy=strategy)


@pytest.mark.parametrize("strategy", ["global", "smem", "lanes", "coop", "packed"])
@pytest.mark.parametrize("dtype_name,tol", [("float32", FP32_TOL), ("float16", FP16_TOL)])
@pytest.mark.parametrize("name", ["tiny-sca", "tiny-tsa", "three-levels-D12", "odd-D3", "D32-one-row-P8-G2",
                                  "D32-tail-P8-G4"])
def test_border_and_out_of_bounds_sampling(name, dtype_name, tol, strategy):
    _check(ALL_CASES[name], getattr(_torch(), dtype_name), tol, border=True, strategy=strategy)


@pytest.mark.parametrize("strategy", ["global", "smem", "lanes", "coop", "packed"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("name", ["tiny-tsa", "tiny-sca", "tiny-decoder", "three-levels-D12"])
def test_non_finite_sampling_positions_contribute_nothing(name, dtype_name, strategy):
    """A NaN or infinite offset (an fp16 overflow upstream, say) fails the plugin's bounds test like any point
    far outside the map: the output must equal the one with that offset moved far out, and stay finite."""
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    B, shapes, M, D, Q, P, G = ALL_CASES[name]
    inp = T.msda_inputs(np.random.default_rng(), B, shapes, M, D, Q, P, G)
    if strategy == "smem" and sum(h * w for h, w in shapes) * D * (4 if dtype == torch.float32 else 2) > 200 * 1024:
        pytest.skip("value slice too large for shared memory")
    bad = np.random.default_rng(1).random(inp.sampling_offsets.shape) < 0.2
    poison = np.random.default_rng(2).choice([np.nan, np.inf, -np.inf], size=inp.sampling_offsets.shape)
    nonfinite = np.where(bad, poison, inp.sampling_offsets)
    far = np.where(bad, 1.0e4, inp.sampling_offsets)
    got_bad = _run(T.MsdaInputs(inp.value, inp.spatial_shapes, inp.reference_points, nonfinite,
                                inp.attention_weights), dtype, (B, Q, M, D), strategy)
    got_far = _run(T.MsdaInputs(inp.value, inp.spatial_shapes, inp.reference_points, far, inp.attention_weights),
                   dtype, (B, Q, M, D), strategy)
    assert np.isfinite(got_bad).all()
    np.testing.assert_array_equal(got_bad, got_far)


def test_misaligned_storage_uses_a_correct_path():
    """A value view whose start is not 16-byte aligned must not be read with vector loads."""
    torch = _torch()
    B, shapes, M, D, Q, P, G = ALL_CASES["tiny-decoder"]
    rng = np.random.default_rng()
    inp = T.msda_inputs(rng, B, shapes, M, D, Q, P, G)
    dev = torch.device("cuda")
    flat = torch.empty(inp.value.size + 1, dtype=torch.float32, device=dev)
    value = flat[1:].view(inp.value.shape)
    value.copy_(torch.tensor(inp.value, dtype=torch.float32))
    assert value.data_ptr() % 16 != 0
    got = cuda.ms_deform_attn(value, torch.tensor(inp.spatial_shapes, device=dev),
                              *(torch.tensor(a, dtype=torch.float32, device=dev) for a in inp.as_tuple()[2:]))
    ref = reference.ms_deform_attn(*(T.rounded(a, np.float32) if a.dtype.kind == "f" else a
                                     for a in inp.as_tuple()))
    assert T.rel_err(got.double().cpu().numpy(), ref) < FP32_TOL


def test_repeat_runs_are_bitwise_identical():
    """No atomics or shared state: two runs on the same inputs must agree to the bit (a moving result is a race)."""
    torch = _torch()
    B, shapes, M, D, Q, P, G = ALL_CASES["tiny-sca"]
    inp = T.msda_inputs(np.random.default_rng(), B, shapes, M, D, Q, P, G)
    dev = torch.device("cuda")
    args = [torch.tensor(a, dtype=torch.float16, device=dev) for a in inp.as_tuple()]
    args[1] = torch.tensor(inp.spatial_shapes, device=dev)
    for strategy in ("global", "smem", "lanes", "coop", "packed"):
        form, coop, packed = _forms(strategy)
        a = cuda.ms_deform_attn(*args, strategy=form, _coop=coop, _packed=packed)
        b = cuda.ms_deform_attn(*args, strategy=form, _coop=coop, _packed=packed)
        assert torch.equal(a, b)


@pytest.mark.parametrize("border", [False, True])
@pytest.mark.parametrize("strategy", ["auto", "global", "smem", "lanes", "coop", "packed"])
@pytest.mark.parametrize("name", ["tiny-tsa", "tiny-sca", "tiny-decoder", "D16-G2", "D32-tail-P8-G4",
                                  "D32-tail-P4", "D32-one-row-P8-G2", "D32-one-pixel-P4"])
def test_int8_matches_reference_on_dequantised_inputs(name, strategy, border):
    """INT8 value/offsets/weights with per-tensor scales: the int8 output must be the reference on the
    dequantised inputs, quantised with the output scale (T.MsdaInt8Case.check says how exactly); also with
    sampling points exactly on and around the borders."""
    torch = _torch()
    B, shapes, M, D, Q, P, G = ALL_CASES[name]
    case = T.msda_int8_case(np.random.default_rng(), B, shapes, M, D, Q, P, G, border=border)
    sv, so, sa, sout = case.scales
    dev = torch.device("cuda")
    out = torch.full((B, Q, M, D), -77, dtype=torch.int8, device=dev)  # poison: unwritten elements show up
    cuda.ms_deform_attn_int8(torch.tensor(case.value, device=dev), torch.tensor(case.spatial_shapes, device=dev),
                             torch.tensor(case.reference_points, dtype=torch.float32, device=dev),
                             torch.tensor(case.sampling_offsets, device=dev),
                             torch.tensor(case.attention_weights, device=dev), value_scale=sv, offset_scale=so,
                             weight_scale=sa, out_scale=sout, out=out, strategy=_forms(strategy)[0],
                             _coop=_forms(strategy)[1], _packed=_forms(strategy)[2])
    case.check(out.cpu().numpy())


def _launched(monkeypatch):
    names = []
    real = cuda._launch

    def recording(source, kernel, *a, **k):
        names.append(kernel)
        return real(source, kernel, *a, **k)

    monkeypatch.setattr(cuda, "_launch", recording)
    return names


@pytest.mark.parametrize("dtype_name", ["float16", "int8"])
@pytest.mark.parametrize("name", ["tiny-sca", "tiny-tsa", "D32-tail-P8-G4"])
def test_packed_form_launches_the_copy_and_its_gather(name, dtype_name, monkeypatch):
    """_packed=True must run msda_pack_<type> and then msda_pk_lp<P>_<type> (not fall back), and the default rule
    (use_packed) must decide the plain call."""
    torch = _torch()
    B, shapes, M, D, Q, P, G = ALL_CASES[name]
    dev = torch.device("cuda")
    inp = T.msda_inputs(np.random.default_rng(), B, shapes, M, D, Q, P, G)
    sh = torch.tensor(inp.spatial_shapes, device=dev)
    names = _launched(monkeypatch)
    for packed in (True, None):
        names.clear()
        if dtype_name == "int8":
            q = lambda a: torch.tensor(T.quantize_int8(a)[0], device=dev)  # noqa: E731
            cuda.ms_deform_attn_int8(q(inp.value), sh, torch.tensor(inp.reference_points, dtype=torch.float32,
                                                                    device=dev),
                                     q(inp.sampling_offsets), q(inp.attention_weights), value_scale=0.02,
                                     offset_scale=0.05, weight_scale=0.03, out_scale=0.01, _packed=packed)
            kind = "int8"
        else:
            args = [torch.tensor(a, dtype=torch.float16, device=dev) for a in inp.as_tuple()]
            args[1] = sh
            cuda.ms_deform_attn(*args, _packed=packed)
            kind = "fp16"
        if packed or cuda.use_packed(kind, D, 1, P, B * Q * M):
            assert names == [f"msda_pack_{kind}", f"msda_pk_lp{P}_{kind}"]
        else:
            assert len(names) == 1 and not names[0].startswith(("msda_pack", "msda_pk"))


@pytest.mark.parametrize("host_shapes", [True, False])
@pytest.mark.parametrize("dtype_name", ["float16", "int8"])
@pytest.mark.parametrize("name", ["tiny-sca", "D32-tail-P8-G4", "D32-one-row-P8-G2", "D32-one-pixel-P4"])
def test_packed_workspace_layout(name, dtype_name, host_shapes):
    """msda_pack's workspace against a numpy construction: entry (b, m, ey, ex) holds the corners (ey-1+r, ex-1+c)
    of value[b, :, m, :], zero outside the map; fp16 as [r][c][channel], int8 as [channel][corner 2r+c]. The
    workspace is poisoned first (every entry must be written)."""
    torch = _torch()
    B, shapes, M, D, Q, P, G = ALL_CASES[name]
    (H, W), = shapes
    rng = np.random.default_rng()
    dev = torch.device("cuda")
    if dtype_name == "int8":
        v = rng.integers(-128, 128, (B, H * W, M, D)).astype(np.int8)
        tv = torch.tensor(v, device=dev)
    else:
        v = rng.standard_normal((B, H * W, M, D)).astype(np.float16)
        tv = torch.tensor(v, device=dev)
    sh = torch.tensor([[H, W]]) if host_shapes else torch.tensor([[H, W]], device=dev)
    torch.cuda.synchronize()
    E = (H + 1) * (W + 1)
    size = B * M * (E if host_shapes else 2 * H * W + 2) * (128 if dtype_name == "int8" else 256)
    work = torch.full((size,), 0xA5, dtype=torch.uint8, device=dev)  # poisoned: every entry must be written
    res = cuda.msda_pack(tv, sh, work=work)
    assert res.data_ptr() == work.data_ptr()  # the caller's buffer, not a fresh one
    got = res.cpu().numpy()
    grid = np.zeros((B, M, H + 2, W + 2, D), dtype=v.dtype)  # value with a zero ring: grid[.., y + 1, x + 1]
    grid[:, :, 1:H + 1, 1:W + 1] = v.reshape(B, H, W, M, D).transpose(0, 3, 1, 2, 4)
    corners = np.stack([grid[:, :, r:r + H + 1, c:c + W + 1] for r in (0, 1) for c in (0, 1)], 4)  # [B,M,H+1,W+1,4,D]
    if dtype_name == "int8":
        want = corners.transpose(0, 1, 2, 3, 5, 4).reshape(-1).view(np.uint8)
    else:
        want = corners.reshape(-1).view(np.uint8)
    assert got.size >= want.size == B * M * E * (128 if dtype_name == "int8" else 256)
    np.testing.assert_array_equal(got[:want.size], want)


def test_bad_input_is_refused_in_one_line():
    torch = _torch()
    dev = torch.device("cuda")
    v = torch.randn(1, 4, 2, 8, device=dev)
    with pytest.raises(ValueError, match="attention_weights"):
        cuda.ms_deform_attn(v, torch.tensor([[2, 2]], device=dev), torch.rand(1, 3, 1, 2, device=dev),
                            torch.randn(1, 3, 2, 8, device=dev), torch.randn(1, 3, 2, 3, device=dev))


def test_autograd_function_on_gpu_runs_the_kernel_with_host_spatial_shapes():
    """The model passes spatial_shapes as a host constant: torch_ops' forward must still take the CUDA kernel
    (counted through the module attribute it looks up) and agree with the reference."""
    torch = _torch()
    from qdqkit.custom_ops import torch_ops

    B, shapes, M, D, Q, P, G = ALL_CASES["tiny-sca"]
    inp = T.msda_inputs(np.random.default_rng(), B, shapes, M, D, Q, P, G)
    calls = []
    real = cuda.ms_deform_attn

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    cuda.ms_deform_attn = counting
    try:
        args = [torch.tensor(a, dtype=torch.float32, device="cuda") for a in inp.as_tuple()]
        args[1] = torch.tensor(inp.spatial_shapes)  # stays on the host
        got = torch_ops.ms_deform_attn(*args, variant=2)
    finally:
        cuda.ms_deform_attn = real
    assert calls, "torch_ops did not dispatch to the CUDA kernel"
    ref = reference.ms_deform_attn(*(T.rounded(a, np.float32) if a.dtype.kind == "f" else a for a in inp.as_tuple()))
    assert T.rel_err(got.double().cpu().numpy(), ref) < FP32_TOL


@pytest.mark.parametrize("strategy", ["global", "smem"])
@pytest.mark.parametrize("dtype_name,vec,tol", [("float16", 8, FP16_TOL), ("float16", 16, FP16_TOL),
                                               ("float16", 32, FP16_TOL), ("float32", 4, FP32_TOL),
                                               ("float32", 8, FP32_TOL), ("float32", 16, FP32_TOL)])
@pytest.mark.parametrize("name", ["tiny-sca", "tiny-decoder"])
def test_every_channels_per_thread_width(name, dtype_name, vec, tol, strategy):
    """Each width of the single-level kernels (the default is one of them) against the reference."""
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    B, shapes, M, D, Q, P, G = ALL_CASES[name]
    if strategy == "smem" and sum(h * w for h, w in shapes) * D * (4 if dtype == torch.float32 else 2) > 200 * 1024:
        pytest.skip("value slice too large for shared memory")
    npdt = np.float32 if dtype == torch.float32 else np.float16
    raw = T.msda_inputs(np.random.default_rng(), B, shapes, M, D, Q, P, G)
    inp = [T.rounded(a, npdt) if a.dtype.kind == "f" else a for a in raw.as_tuple()]
    dev = torch.device("cuda")
    args = [torch.tensor(a, dtype=dtype, device=dev) for a in inp]
    args[1] = torch.tensor(raw.spatial_shapes, device=dev)
    out = T.poisoned((B, Q, M, D), dtype, dev)
    cuda.ms_deform_attn(*args, out=out, strategy=strategy, _vec=vec)
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any()
    assert T.rel_err(got, reference.ms_deform_attn(*inp)) < tol
