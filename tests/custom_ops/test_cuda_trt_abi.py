"""The PTX that the TensorRT AOT plugins embed, launched the way TensorRT launches it, against the reference.

TensorRT cannot be installed here, so this exercises everything of ``trt_plugins`` except TensorRT itself:
the PTX text from :func:`trt_plugins.ptx`, loaded with the CUDA driver API (cuModuleLoadData, i.e. JIT from
PTX as TensorRT does), the kernel name, grid and block that the ``*_launch`` plan gives for each shape, and the
argument order tensor inputs -> int32 extras -> tensor outputs, with INT8 scales as fp32 bit patterns in int32
extras. Not exercised: ``tensorrt.plugin`` registration, shape expressions evaluated by TensorRT, format
negotiation, and the ONNX parser's mapping of nodes to these plugins.
"""

import ctypes

import numpy as np
import pytest

from qdqkit.custom_ops import cuda, reference
from qdqkit.custom_ops.cuda import testing as T
from qdqkit.custom_ops.cuda import trt_plugins as tp


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python
        except ImportError:
            return None
    return driver


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda.available(), reason=f"CUDA kernels unavailable: {cuda.unavailable_reason()}"),
    pytest.mark.skipif(_driver() is None, reason="cuda-python (cuda.bindings) is not installed"),
]


def _ok(result):
    err = result[0]
    assert int(err) == 0, f"CUDA driver call failed: {err}"
    return result[1] if len(result) > 1 else None


_modules = {}


def _function(source, kernel):
    drv = _driver()
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")  # makes torch's primary context current on this thread
    if source not in _modules:
        ptx = tp.ptx(source)
        assert ptx.lstrip().startswith(b"//") or b".version" in ptx, "not PTX text"
        _modules[source] = _ok(drv.cuModuleLoadData(ptx + b"\x00"))
    return _ok(drv.cuModuleGetFunction(_modules[source], kernel.encode()))


def _launch_trt_style(launch: tp.Launch, inputs, outputs):
    """cuLaunchKernel with TensorRT's AOT argument order: inputs, int32 extras, outputs."""
    drv = _driver()
    import torch

    fn = _function(launch.source, launch.kernel)
    values = [t.data_ptr() for t in inputs] + [int(e) for e in launch.extras] + [t.data_ptr() for t in outputs]
    types = ([ctypes.c_void_p] * len(inputs) + [ctypes.c_int32] * len(launch.extras)
             + [ctypes.c_void_p] * len(outputs))
    stream = torch.cuda.current_stream().cuda_stream
    if launch.shared_mem > 48 * 1024:
        pytest.fail("TensorRT AOT launches must stay within 48 KB of dynamic shared memory")
    _ok(drv.cuLaunchKernel(fn, *[int(g) for g in launch.grid], *launch.block, launch.shared_mem, drv.CUstream(stream),
                           (tuple(values), tuple(types)), 0))
    torch.cuda.synchronize()


@pytest.mark.parametrize("form", ["global", "smem"])
@pytest.mark.parametrize("dtype_name,tol", [("float32", 1e-4), ("float16", 2e-3)])
@pytest.mark.parametrize("case", ["sca", "decoder", "odd"])
def test_msda_ptx_with_trt_abi(case, dtype_name, tol, form):
    import torch

    cases = {**T.BEVFORMER_TINY_MSDA, "odd": (2, [(7, 5), (3, 11)], 3, 6, 21, 4, 2)}
    B, shapes, M, D, Q, P, G = cases[case]
    dtype = getattr(torch, dtype_name)
    npdt = np.float32 if dtype == torch.float32 else np.float16
    raw = T.msda_inputs(np.random.default_rng(), B, shapes, M, D, Q, P, G)
    inp = [T.rounded(a, npdt) if a.dtype.kind == "f" else a for a in raw.as_tuple()]
    dev = torch.device("cuda")
    tens = [torch.tensor(a, dtype=dtype, device=dev) for a in inp]
    tens[1] = torch.tensor(raw.spatial_shapes, dtype=torch.int64, device=dev)
    out = T.poisoned((B, Q, M, D), dtype, dev)
    if form == "smem" and case == "decoder":
        pytest.skip("a 2500-position slice does not fit the 48 KB a TensorRT AOT launch may use")
    launch = tp.msda_launch("fp32" if dtype == torch.float32 else "fp16", (B, sum(h * w for h, w in shapes), M, D),
                            len(shapes), 2 * G, len(shapes) * P, Q, form=form)
    assert launch.kernel.startswith("msda_smem_") == (form == "smem")
    _launch_trt_style(launch, tens, [out])
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any()
    assert T.rel_err(got, reference.ms_deform_attn(*inp)) < tol


@pytest.mark.parametrize("case,form", [("sca", "global"), ("sca", "smem"), ("tsa", "global")])
def test_msda_int8_ptx_with_trt_abi(case, form):
    import torch

    B, shapes, M, D, Q, P, G = T.BEVFORMER_TINY_MSDA[case]
    c = T.msda_int8_case(np.random.default_rng(), B, shapes, M, D, Q, P, G)
    dev = torch.device("cuda")
    out = torch.full((B, Q, M, D), -77, dtype=torch.int8, device=dev)
    S = sum(h * w for h, w in shapes)
    launch = tp.msda_launch("int8", (B, S, M, D), 1, 2 * G, P, Q, scales=c.scales, form=form)
    _launch_trt_style(launch, [torch.tensor(c.value, device=dev), torch.tensor(c.spatial_shapes, device=dev),
                               torch.tensor(c.reference_points, dtype=torch.float32, device=dev),
                               torch.tensor(c.sampling_offsets, device=dev),
                               torch.tensor(c.attention_weights, device=dev)], [out])
    c.check(out.cpu().numpy())
    expected = {("sca", "smem"): "msda_smem_lp8_int8_v8", ("sca", "global"): "msda_co_lp8_int8",
                ("tsa", "global"): "msda_co_lp4_int8"}
    assert launch.kernel == expected[(case, form)]


@pytest.mark.parametrize("mode", [1, 0])
@pytest.mark.parametrize("dtype_name,tol", [("float32", 1e-4), ("float16", 2e-3)])
def test_rotate_ptx_with_trt_abi(dtype_name, tol, mode):
    import torch

    dtype = getattr(torch, dtype_name)
    npdt = np.float32 if dtype == torch.float32 else np.float16
    C, H, W = T.BEVFORMER_TINY_ROTATE
    rng = np.random.default_rng()
    img = T.rounded(rng.standard_normal((C, H, W)), npdt)
    angle = float(np.asarray(rng.uniform(-30, 30), dtype=npdt))
    center = T.rounded(np.array([100.0, 100.0]), npdt)
    dev = torch.device("cuda")
    out = T.poisoned((C, H, W), dtype, dev)
    _launch_trt_style(tp.rotate_launch("fp32" if dtype == torch.float32 else "fp16", (C, H, W), mode),
                      [torch.tensor(img, dtype=dtype, device=dev), torch.tensor(angle, dtype=dtype, device=dev),
                       torch.tensor(center, dtype=dtype, device=dev)], [out])
    got = out.double().cpu().numpy()
    ref = reference.rotate(img, angle, center, mode)
    if mode == 1:
        keep = ~T.rotate_ambiguous(H, W, angle, center, tol=1e-4)
        got, ref = got[:, keep], ref[:, keep]
    assert not np.isnan(got).any()
    assert T.rel_err(got, ref) < tol


@pytest.mark.parametrize("dtype_name,tol", [("float32", 1e-4), ("float16", 2e-3)])
def test_dcn_ptx_with_trt_abi(dtype_name, tol):
    import torch

    dtype = getattr(torch, dtype_name)
    npdt = np.float32 if dtype == torch.float32 else np.float16
    N, C, H, W, OC, k, stride, padding, dilation, groups, dg = 2, 16, 13, 17, 12, (3, 3), (2, 1), (1, 1), (1, 2), 2, 2
    args = [T.rounded(a, npdt) for a in T.dcn_inputs(np.random.default_rng(), N, C, H, W, OC, k, stride, padding,
                                                     dilation, groups, dg)]
    ref = reference.modulated_deform_conv2d(*args, stride, padding, dilation, groups, dg)
    dev = torch.device("cuda")
    out = T.poisoned(ref.shape, dtype, dev)
    launch = tp.dcn_launch("fp32" if dtype == torch.float32 else "fp16", (N, C, H, W), (OC, C // groups, *k),
                           stride, padding, dilation, groups, dg)
    _launch_trt_style(launch, [torch.tensor(a, dtype=dtype, device=dev) for a in args], [out])
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any()
    assert T.rel_err(got, ref) < tol
