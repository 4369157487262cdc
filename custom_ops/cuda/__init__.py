"""CUDA kernels for BEVFormer's custom ops, callable on PyTorch CUDA tensors.

Kernels: MultiScaleDeformableAttn (fp32; fp16 with channels packed in 16-byte vectors of half2 pairs; an
INT8 variant with per-tensor scales), Rotate (fp32, fp16; nearest and bilinear) and ModulatedDeformableConv2d
(fp32, fp16). Sources live beside this file (``*.cu``), compiled at first use by NVRTC through CuPy and
launched on PyTorch's current stream, so CUDA-graph capture and stream semantics follow torch.

Importing this package never imports torch's CUDA state, CuPy or the CUDA bindings; :func:`available` is
cheap, never raises and is False on a machine without a usable GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Optional, Sequence, Tuple, Union

__all__ = [
    "available",
    "unavailable_reason",
    "ms_deform_attn",
    "ms_deform_attn_int8",
    "rotate",
    "modulated_deform_conv2d",
]

_BLOCK = 256


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> Optional[str]:
    """None when the kernels can run here, else one line saying what is missing."""
    try:
        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed"
        if importlib.util.find_spec("cupy") is None:
            return "CuPy is not installed (the kernels are compiled with NVRTC through CuPy)"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to PyTorch"
    except Exception as exc:  # available() must never raise, whatever a broken install does
        return f"CUDA check failed: {exc}"
    return None


def available() -> bool:
    """True when a CUDA GPU, PyTorch with CUDA, and CuPy are all present (cheap; never raises)."""
    return unavailable_reason() is None


# --------------------------------------------------------------------------------------------------------
# launching

@functools.lru_cache(maxsize=None)
def _libcuda():
    """ctypes handle of the CUDA driver, or None (then launches go through CuPy, with more host overhead)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernel.restype = ctypes.c_int
        lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        return lib
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _external_stream(ptr: int, device_index: int):
    import cupy

    return cupy.cuda.ExternalStream(ptr, device_index)


def _raw_stream(index: int) -> int:
    import torch

    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(index) if get is not None else torch.cuda.current_stream(index).cuda_stream


def _launch(source: str, kernel: str, grid: Tuple[int, ...], args: Sequence, device, shared_mem: int = 0) -> None:
    """Launches ``kernel`` of ``source`` on torch's current stream of ``device``.

    The driver's cuLaunchKernel is called through ctypes, the shortest path from Python (CuPy's launch adds
    argument conversion and stream/device context switches per call; it remains the fallback). Tensors travel
    as 64-bit pointers, ints as int32.
    """
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    fn, ptr = _kernel(source, kernel, index, shared_mem)
    stream = _raw_stream(index)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    lib = _libcuda() if ptr else None
    if lib is not None and index != torch.cuda.current_device():
        # the driver launches into the calling thread's current context, which must be this device's
        with torch.cuda.device(index):
            return _launch(source, kernel, grid, args, device, shared_mem)
    if lib is not None:
        values, params = _param_block(len(args))
        for i, a in enumerate(args):
            # an int32 argument is read from the low 4 bytes of its 8-byte slot (little-endian, as every CUDA host)
            values[i] = a.data_ptr() if isinstance(a, torch.Tensor) else int(a) & 0xFFFFFFFF
        err = lib.cuLaunchKernel(ptr, grid[0], grid[1], grid[2], _BLOCK, 1, 1, shared_mem, stream,
                                 params, None)
        if err != 0:
            raise RuntimeError(f"{kernel}: cuLaunchKernel failed with CUDA driver error {err}")
        return
    import cupy
    import numpy as np

    packed = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else np.int32(int(a)) for a in args)
    with cupy.cuda.Device(index), _external_stream(stream, index):
        fn(grid, (_BLOCK,), packed, shared_mem=shared_mem)


_PARAMS = threading.local()


def _param_block(n: int):
    """(values, params) for a launch of ``n`` arguments: ``n`` 8-byte value slots and the array of pointers to
    them that cuLaunchKernel takes. Made once per thread and size and refilled on every launch (the driver copies
    the arguments during the call, also while a CUDA graph is being captured), which spares the ctypes objects
    per argument that otherwise dominate a launch's host time."""
    blocks = getattr(_PARAMS, "blocks", None)
    if blocks is None:
        blocks = _PARAMS.blocks = {}
    block = blocks.get(n)
    if block is None:
        import ctypes

        values = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(values)
        block = blocks[n] = (values, (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)]))
    return block


@functools.lru_cache(maxsize=None)
def _kernel_base(source: str, kernel: str, device_index: int):
    """(CuPy RawKernel, its CUfunction handle) of one kernel on one device; the handle is 0 when this CuPy does
    not expose it (then launches go through CuPy)."""
    from . import _build

    fn = _build.module(source, device_index).get_function(kernel)
    try:
        ptr = int(fn.kernel.ptr)
    except AttributeError:
        ptr = 0
    return fn, ptr


def _kernel(source: str, kernel: str, device_index: int, shared_mem: int):
    fn, ptr = _kernel_base(source, kernel, device_index)
    if shared_mem > 48 * 1024 and (kernel, device_index) not in _SMEM_RAISED:
        import cupy

        with cupy.cuda.Device(device_index):
            fn.max_dynamic_shared_size_bytes = _device_info(device_index)[1]
        _SMEM_RAISED.add((kernel, device_index))
    return fn, ptr


_SMEM_RAISED: set = set()


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> Tuple[int, int]:
    """(multiprocessor count, opt-in shared memory per block in bytes) of a device."""
    import torch

    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def _check_cuda(name: str, *tensors) -> None:
    import torch

    dev = tensors[0].device
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda" or t.device != dev:
            raise ValueError(f"{name}: every input must be a CUDA tensor on one device")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{name}: CUDA kernels unavailable: {reason}")


def _float_dtype(name: str, t) -> str:
    import torch

    if t.dtype == torch.float32:
        return "fp32"
    if t.dtype == torch.float16:
        return "fp16"
    raise TypeError(f"{name}: expected float32 or float16, got {t.dtype}")


def _prepare_out(name: str, out, shape, like):
    import torch

    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name}: out must be {like.dtype} {tuple(shape)} on {like.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name}: out must be contiguous")
    return out


def _grid1(n: int) -> Tuple[int]:
    return ((n + _BLOCK - 1) // _BLOCK,)


def _aligned(vec_bytes: int, *tensors) -> bool:
    return all(t.data_ptr() % vec_bytes == 0 for t in tensors)


# --------------------------------------------------------------------------------------------------------
# MultiScaleDeformableAttn

def _msda_shapes(value, spatial_shapes, reference_points, sampling_offsets, attention_weights):
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [B,S,M,D], got {tuple(value.shape)}")
    B, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be [L,2], got {tuple(spatial_shapes.shape)}")
    if attention_weights.dim() != 4 or sampling_offsets.dim() != 4 or reference_points.dim() != 4:
        raise ValueError("ms_deform_attn: reference_points, sampling_offsets, attention_weights must be 4-D")
    Q = sampling_offsets.shape[1]
    LP = attention_weights.shape[3]
    if LP % L:
        raise ValueError(f"ms_deform_attn: attention_weights last dim {LP} is not a multiple of L={L}")
    P = LP // L
    G = reference_points.shape[3] // 2
    if tuple(sampling_offsets.shape) != (B, Q, M, LP * 2) or tuple(attention_weights.shape) != (B, Q, M, LP):
        raise ValueError("ms_deform_attn: sampling_offsets must be [B,Q,M,L*P*2] and attention_weights [B,Q,M,L*P]")
    if tuple(reference_points.shape[:3]) != (B, Q, 1) or G < 1 or P % G:
        raise ValueError("ms_deform_attn: reference_points must be [B,Q,1,2G] with P a multiple of G")
    return B, S, M, D, Q, L, P, G


_SHAPES_CACHE: dict = {}


def _shapes_i64(spatial_shapes, device):
    """spatial_shapes as int64 on ``device``; a host tensor (the usual form: a constant) is uploaded once."""
    import torch

    if spatial_shapes.device.type != "cpu":
        return spatial_shapes.to(device=device, dtype=torch.int64).contiguous()
    key = (tuple(int(v) for v in spatial_shapes.reshape(-1).tolist()), str(device))
    t = _SHAPES_CACHE.get(key)
    if t is None:
        t = torch.tensor(key[0], dtype=torch.int64, device=device).reshape(-1, 2)
        _SHAPES_CACHE[key] = t
    return t


_AUTO_SMEM = False


def _msda_plan(B, S, M, D, Q, L, P, esize, device, strategy: str):
    """("global", None, grid, 0) or ("smem", qchunk, grid, shared bytes) for one call; see msda.cu."""
    if strategy not in ("auto", "global", "smem"):
        raise ValueError(f"ms_deform_attn: strategy must be 'auto', 'global' or 'smem', got {strategy!r}")
    index = device.index if device.index is not None else 0
    sms, smem_max = _device_info(index)
    slice_bytes = S * D * esize
    fits = slice_bytes <= smem_max
    if strategy == "smem" and not fits:
        raise ValueError(f"ms_deform_attn: a (batch, head) value slice of {slice_bytes} bytes exceeds shared memory")
    # small slices: several blocks per SM, about eight waves of them; large ones: one block per SM, one wave
    nchunks = -(-8 * sms // (B * M)) if slice_bytes <= 48 * 1024 else max(1, sms // (B * M))
    nchunks = max(1, min(nchunks, Q))
    staging = B * M * nchunks * slice_bytes
    gathers = B * Q * M * L * P * 4 * D * esize
    # "auto" keeps the global form: on an H100 the staged form never won at BEVFormer's shapes (the calls are
    # bound by instruction issue and latency, and L2 holds the value slices); GPU_NOTES.md has the figures
    use_smem = strategy == "smem" or (strategy == "auto" and _AUTO_SMEM and fits and 2 * staging < gathers)
    if use_smem:
        qchunk = -(-Q // nchunks)
        return "smem", qchunk, (-(-Q // qchunk), B * M), slice_bytes
    return "global", None, None, 0


# Channels a thread owns in the single-level kernels, by (dtype, points): fewer threads per (b,q,m) recompute
# its softmax and sampling locations fewer times, more threads hide more latency. Measured on an H100 at the
# BEVFormer-tiny shapes (benchmarks/GPU_NOTES.md, sweep): 8 points (spatial cross-attention) favour the wider
# split, 4 points (temporal self-attention, decoder) the narrower one.
_WIDE_VEC = {("fp16", 8): 16, ("fp16", 4): 8, ("fp32", 8): 8, ("fp32", 4): 4}


# The cooperative D = 32 kernels (msda_co_*, see msda.cu) against the per-lane ones, measured on an H100 at the
# BEVFormer-tiny shapes (benchmarks/GPU_NOTES.md): faster for the temporal self-attention (40,000 (b,q,m)
# groups) and the spatial cross-attention (120,000), in every type; not for the decoder (7,200 groups: too
# little work to hide the extra shuffle round trips, 5.4 against 5.0 us in fp16).
COOP_MIN_GROUPS = 16384
_COOP_POINTS = {"fp16": (4, 8), "fp32": (4, 8), "int8": (4, 8)}


def use_coop(kind: str, D, L, P, groups: Optional[int]) -> bool:
    """Whether a call takes the cooperative kernels by default: D = 32, one level, 4 or 8 points, and at least
    :data:`COOP_MIN_GROUPS` (b, q, m) groups (``groups`` None: unknown, counted as enough)."""
    return (D == 32 and L == 1 and P in _COOP_POINTS[kind]
            and (groups is None or groups >= COOP_MIN_GROUPS))


# The packed form (msda.cu: msda_pack_<type> copies value into a corner-packed workspace, msda_pk_lp<P>_<type>
# gathers from it; fp16 and int8 only, for D = 32, one level, 4 or 8 points). Where it is the default: the point
# counts below, for calls that take the cooperative kernels (use_coop), as measured on an H100 at the BEVFormer-tiny
# shapes (benchmarks/GPU_NOTES.md, R14). The TensorRT plugins cannot take it (an AOT plugin launches one kernel and
# has no workspace): trt_plugins.msda_launch keeps the cooperative kernels.
_PACKED_POINTS = {"fp16": (), "int8": (8,), "fp32": ()}
_PACK_ENTRY_BYTES = {"fp16": 256, "int8": 128}


def use_packed(kind: str, D, L, P, groups: Optional[int]) -> bool:
    """Whether a PyTorch call takes the packed form by default (a subset of :func:`use_coop`)."""
    return use_coop(kind, D, L, P, groups) and P in _PACKED_POINTS[kind]


def _pack_entries(spatial_shapes, S: int) -> int:
    """Workspace entries a (b, m) slice needs: (H + 1) * (W + 1) where the shapes are on the host, else the bound
    2 S + 2 (H * W <= S, so H + W <= S + 1), which needs no device-to-host read (and stays graph-capturable)."""
    if spatial_shapes.device.type == "cpu":
        h, w = (int(v) for v in spatial_shapes.reshape(-1)[:2].tolist())
        return (h + 1) * (w + 1)
    return 2 * S + 2


def _packed_ok(kind: str, D, L, P, value, form, B, Q, M) -> bool:
    """Whether the packed form can serve this call at all (a forced ``_packed=True`` included): where the
    cooperative kernels can, for fp16 and int8, within the copy's grid and the gather's 32-bit indexing."""
    return (kind in _PACK_ENTRY_BYTES and _coop_ok(D, L, P, value, form) and B * M < 65536
            and value.numel() * value.element_size() < 2**31 and B * Q * M * 8 < 2**31)


def _pack(kind: str, value, spatial_shapes, shapes, B, S, M, D, work=None):
    """Launches msda_pack_<kind> (value, [B,S,M,32], into the corner-packed workspace), in ``work`` where given (a
    uint8 tensor of at least the bytes needed), else in a fresh one; returns the workspace, or None where it would
    exceed 2 GB (nothing launched)."""
    import torch

    entries = _pack_entries(spatial_shapes, S)
    nbytes = B * M * entries * _PACK_ENTRY_BYTES[kind]
    if nbytes >= 2**31:
        return None
    if work is None:
        work = torch.empty(nbytes, dtype=torch.uint8, device=value.device)
    elif work.dtype != torch.uint8 or work.numel() < nbytes or work.device != value.device:
        raise ValueError(f"msda_pack: work must be a uint8 tensor of at least {nbytes} bytes on {value.device}")
    grid = (_grid1(entries * _PACK_ENTRY_BYTES[kind] // 16)[0], B * M)  # 16-byte pieces of a slice, (b, m)
    _launch("msda", f"msda_pack_{kind}", grid, (value, shapes, B, S, M, D, work), value.device)
    return work


def _run_packed(kind: str, value, spatial_shapes, shapes, ref, off, aw, out, B, S, M, D, Q, L, P, G,
                scales=()) -> bool:
    """Packs value into a workspace and gathers from it (the packed form; the caller checked :func:`_packed_ok`);
    False where the workspace would be too large (then nothing was launched)."""
    work = _pack(kind, value, spatial_shapes, shapes, B, S, M, D)
    if work is None:
        return False
    _launch("msda", f"msda_pk_lp{P}_{kind}", _grid1(B * Q * M * 8),
            (work, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, *scales, out), value.device)
    return True


def msda_pack(value, spatial_shapes, work=None):
    """The packed form's workspace for ``value`` (fp16 or int8, [B,S,M,32], one level) as a uint8 tensor: what
    :func:`ms_deform_attn` builds before its gather (for the benchmarks, which time the copy alone, and the tests,
    which hand in a poisoned ``work``)."""
    import torch

    kind = "int8" if value.dtype == torch.int8 else _float_dtype("msda_pack", value)
    B, S, M, D = value.shape
    if not _packed_ok(kind, D, len(spatial_shapes), 4, value, "global", B, 1, M):
        raise ValueError("msda_pack: value must be fp16 or int8 [B,S,M,32] with one level")
    work = _pack(kind, value.contiguous(), spatial_shapes, _shapes_i64(spatial_shapes, value.device), B, S, M, D,
                 work)
    if work is None:
        raise ValueError("msda_pack: the workspace would exceed 2 GB")
    return work


def _coop_ok(D, L, P, value, form) -> bool:
    """Whether the cooperative kernels can serve this call at all (a forced ``_coop=True`` included)."""
    return form == "global" and D == 32 and L == 1 and P in (4, 8) and value.numel() < 2**31


def ms_deform_attn(value, spatial_shapes, reference_points, sampling_offsets, attention_weights, *, out=None,
                   strategy: str = "auto", _vec: Optional[int] = None, _coop: Optional[bool] = None,
                   _packed: Optional[bool] = None):
    """MultiScaleDeformableAttnTRT(2) on CUDA tensors (fp32 or fp16; softmax of the logits inside).

    value [B,S,M,D], spatial_shapes int [L,2] (H,W), reference_points [B,Q,1,2G], sampling_offsets
    [B,Q,M,L*P*2] (pixels), attention_weights [B,Q,M,L*P] (logits) -> [B,Q,M,D] in value's dtype.
    Float inputs are cast to value's dtype. ``out`` optionally names a contiguous output buffer. ``strategy``
    picks the kernel form: "global" gathers corners through the caches, "smem" stages each (batch, head) value
    slice in shared memory first; "auto" is "global", the faster of the two at every BEVFormer shape measured.
    Within "global", single-level calls with D = 32, 4 or 8 points and enough (b, q, m) groups take the
    cooperative kernels (:func:`use_coop`); fp16 calls among them take the packed form (a copy of value into a
    corner-packed workspace, then the gather) where :func:`use_packed` names them (no shape at present: it was
    slower than the cooperative kernel at BEVFormer-tiny's, GPU_NOTES.md R14). ``_vec``, ``_coop`` and ``_packed``
    force a kernel, for tests and benchmarks (``_vec`` or ``_coop`` alone turn the packed form off).
    """
    _check_cuda("ms_deform_attn", value, reference_points, sampling_offsets, attention_weights)
    kind = _float_dtype("ms_deform_attn", value)
    B, S, M, D, Q, L, P, G = _msda_shapes(value, spatial_shapes, reference_points, sampling_offsets,
                                          attention_weights)
    dt = value.dtype
    value = value.contiguous()
    ref = reference_points.to(dt).contiguous()
    off = sampling_offsets.to(dt).contiguous()
    aw = attention_weights.to(dt).contiguous()
    shapes = _shapes_i64(spatial_shapes, value.device)
    out = _prepare_out("ms_deform_attn", out, (B, Q, M, D), value)
    if out.numel() == 0:
        return out
    esize = value.element_size()
    vec = 1
    for cand in ((8, 2) if kind == "fp16" else (4,)):
        if D % cand == 0 and _aligned(cand * esize, value, out):
            vec = cand
            break
    form, qchunk, grid, smem = _msda_plan(B, S, M, D, Q, L, P, esize, value.device, strategy)
    narrow = 8 if kind == "fp16" else 4
    coop = _coop if _coop is not None else (_vec is None and use_coop(kind, D, L, P, B * Q * M))
    packed = _packed if _packed is not None else (_vec is None and _coop is None and coop
                                                  and P in _PACKED_POINTS[kind])
    if (packed and vec == 8 and _packed_ok(kind, D, L, P, value, form, B, Q, M)
            and _run_packed(kind, value, spatial_shapes, shapes, ref, off, aw, out, B, S, M, D, Q, L, P, G)):
        return out
    if coop and vec == narrow and _coop_ok(D, L, P, value, form):
        _launch("msda", f"msda_co_lp{P}_{kind}", _grid1(B * Q * M * (D // vec)),
                (value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, out), value.device)
        return out
    prefix = _fast_prefix(L, P, vec in (4, 8) and value.numel() < 2**31, aw, off)
    if prefix:
        wide = _WIDE_VEC[(kind, P)] if _vec is None else int(_vec)
        if wide > vec and D % wide == 0 and _aligned(min(64, wide * esize), value, out):
            vec = wide
    name = f"{prefix}{kind}_v{vec}"
    if form == "smem":
        _launch("msda", f"msda_smem_{name}", grid, (value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G,
                                                   qchunk, out), value.device, smem)
    else:
        _launch("msda", f"msda_{name}", _grid1(B * Q * M * (D // vec)),
                (value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, out), value.device)
    return out


def _fast_prefix(L, P, wide: bool, *runs) -> str:
    """"lp4_" / "lp8_" for the single-level kernels with a compile-time point count (vector loads of the logits
    and offsets need 16-byte aligned tensors; 32-bit indexing needs value under 2^31 elements), else ""."""
    if L == 1 and P in (4, 8) and wide and _aligned(16, *runs):
        return f"lp{P}_"
    return ""


def _float_bits(x: float) -> int:
    import struct

    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def ms_deform_attn_int8(value, spatial_shapes, reference_points, sampling_offsets, attention_weights, *,
                        value_scale: float, offset_scale: float, weight_scale: float, out_scale: float,
                        out=None, strategy: str = "auto", _coop: Optional[bool] = None,
                        _packed: Optional[bool] = None):
    """INT8 MultiScaleDeformableAttn as the TensorRT plugin takes it: int8 value, offsets and weights with
    per-tensor scales (real = scale * int8), fp32 reference points; returns int8 [B,Q,M,D] quantised with
    ``out_scale`` (round half to even, saturating to [-128, 127]). Needs D % 8 == 0. Calls that
    :func:`use_packed` names take the packed form (corner weights in 23-bit fixed point, combined by dp4a);
    ``_coop`` and ``_packed`` force a kernel (``_coop`` alone turns the packed form off).
    """
    import torch

    _check_cuda("ms_deform_attn_int8", value, reference_points, sampling_offsets, attention_weights)
    for name, t in (("value", value), ("sampling_offsets", sampling_offsets),
                    ("attention_weights", attention_weights)):
        if t.dtype != torch.int8:
            raise TypeError(f"ms_deform_attn_int8: {name} must be int8, got {t.dtype}")
    for name, s in (("value_scale", value_scale), ("offset_scale", offset_scale),
                    ("weight_scale", weight_scale), ("out_scale", out_scale)):
        if not float(s) > 0:
            raise ValueError(f"ms_deform_attn_int8: {name} must be positive, got {s}")
    B, S, M, D, Q, L, P, G = _msda_shapes(value, spatial_shapes, reference_points, sampling_offsets,
                                          attention_weights)
    if D % 8:
        raise ValueError(f"ms_deform_attn_int8: D must be a multiple of 8, got {D}")
    value = value.contiguous()
    ref = reference_points.to(torch.float32).contiguous()
    off = sampling_offsets.contiguous()
    aw = attention_weights.contiguous()
    shapes = _shapes_i64(spatial_shapes, value.device)
    out = _prepare_out("ms_deform_attn_int8", out, (B, Q, M, D), value)
    if out.numel() == 0:
        return out
    if not _aligned(8, value, out):
        value = value.clone()
        if not _aligned(8, out):
            raise ValueError("ms_deform_attn_int8: out must be 8-byte aligned")
    scales = (_float_bits(value_scale), _float_bits(offset_scale), _float_bits(weight_scale),
              _float_bits(out_scale))
    form, qchunk, grid, smem = _msda_plan(B, S, M, D, Q, L, P, 1, value.device, strategy)
    coop = _coop if _coop is not None else use_coop("int8", D, L, P, B * Q * M)
    packed = _packed if _packed is not None else (_coop is None and coop and P in _PACKED_POINTS["int8"])
    if (packed and _packed_ok("int8", D, L, P, value, form, B, Q, M)
            and _run_packed("int8", value, spatial_shapes, shapes, ref, off, aw, out, B, S, M, D, Q, L, P, G,
                            scales)):
        return out
    if coop and _coop_ok(D, L, P, value, form):
        _launch("msda", f"msda_co_lp{P}_int8", _grid1(B * Q * M * (D // 8)),
                (value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, *scales, out), value.device)
        return out
    name = f"{_fast_prefix(L, P, value.numel() < 2**31, aw, off)}int8_v8"
    if form == "smem":
        _launch("msda", f"msda_smem_{name}", grid,
                (value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, qchunk, *scales, out), value.device, smem)
    else:
        _launch("msda", f"msda_{name}", _grid1(B * Q * M * (D // 8)),
                (value, shapes, ref, off, aw, B, S, M, D, Q, L, P, G, *scales, out), value.device)
    return out


# --------------------------------------------------------------------------------------------------------
# Rotate

_ROTATE_CHANNELS_PER_THREAD = 8  # QK_ROTATE_RC in rotate.cu


def rotate(img, angle, center, interpolation: int = 1, *, out=None):
    """RotateTRT(2) on a CUDA tensor: img [C,H,W] (fp32 or fp16), angle 0-d (degrees), center [2] (x, y);
    interpolation 0 bilinear, 1 nearest; zero fill. Angle and centre may be tensors or Python numbers.
    """
    import torch

    if not isinstance(angle, torch.Tensor):
        angle = torch.tensor(float(angle), device=img.device)
    if not isinstance(center, torch.Tensor):
        center = torch.tensor([float(c) for c in center], device=img.device)
    _check_cuda("rotate", img, angle, center)
    kind = _float_dtype("rotate", img)
    if img.dim() != 3:
        raise ValueError(f"rotate: img must be [C,H,W], got {tuple(img.shape)}")
    if angle.numel() != 1 or center.numel() != 2:
        raise ValueError("rotate: angle must hold one value and center two")
    if int(interpolation) not in (0, 1):
        raise ValueError(f"rotate: interpolation must be 0 (bilinear) or 1 (nearest), got {interpolation}")
    C, H, W = img.shape
    img = img.contiguous()
    angle = angle.to(img.dtype).reshape(()).contiguous()
    center = center.to(img.dtype).reshape(2).contiguous()
    out = _prepare_out("rotate", out, (C, H, W), img)
    if out.numel() == 0:
        return out
    grid = ((H * W + _BLOCK - 1) // _BLOCK, (C + _ROTATE_CHANNELS_PER_THREAD - 1) // _ROTATE_CHANNELS_PER_THREAD)
    _launch("rotate", f"rotate_{kind}", grid, (img, angle, center, C, H, W, int(interpolation), out), img.device)
    return out


# --------------------------------------------------------------------------------------------------------
# ModulatedDeformableConv2d

def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"modulated_deform_conv2d: {name} must be an int or a pair")
    return v


def modulated_deform_conv2d(x, offset, mask, weight, bias=None, stride: Union[int, Sequence[int]] = (1, 1),
                            padding: Union[int, Sequence[int]] = (1, 1),
                            dilation: Union[int, Sequence[int]] = (1, 1), groups: int = 1, deform_groups: int = 1,
                            *, out=None, impl: str = "im2col"):
    """ModulatedDeformableConv2d (DCNv2, mmcv semantics) on CUDA tensors, fp32 or fp16.

    x [N,C,H,W], offset [N,2*DG*KH*KW,Ho,Wo] ((dy,dx) per tap), mask [N,DG*KH*KW,Ho,Wo], weight
    [OC,C/groups,KH,KW], bias [OC] or None -> [N,OC,Ho,Wo]. ``impl="im2col"`` builds the modulated column
    matrix with a CUDA kernel and multiplies it with cuBLAS through torch; ``impl="direct"`` runs the
    single-kernel form that a TensorRT AOT plugin embeds.
    """
    import torch

    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
    _check_cuda("modulated_deform_conv2d", x, offset, mask, weight, bias)
    kind = _float_dtype("modulated_deform_conv2d", x)
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError("modulated_deform_conv2d: x and weight must be 4-D")
    N, C, H, W = x.shape
    OC, Cg, KH, KW = weight.shape
    groups, deform_groups = int(groups), int(deform_groups)
    if groups < 1 or C % groups or OC % groups or Cg != C // groups:
        raise ValueError(f"modulated_deform_conv2d: weight {tuple(weight.shape)} does not fit C={C}, groups={groups}")
    if deform_groups < 1 or C % deform_groups:
        raise ValueError(f"modulated_deform_conv2d: C={C} is not a multiple of deform_groups={deform_groups}")
    Ho = (H + 2 * ph - (dh * (KH - 1) + 1)) // sh + 1
    Wo = (W + 2 * pw - (dw * (KW - 1) + 1)) // sw + 1
    K = KH * KW
    if tuple(offset.shape) != (N, 2 * deform_groups * K, Ho, Wo) or tuple(mask.shape) != (N, deform_groups * K, Ho, Wo):
        raise ValueError(f"modulated_deform_conv2d: offset must be {(N, 2 * deform_groups * K, Ho, Wo)} and mask "
                         f"{(N, deform_groups * K, Ho, Wo)}, got {tuple(offset.shape)} and {tuple(mask.shape)}")
    dt = x.dtype
    x = x.contiguous()
    offset = offset.to(dt).contiguous()
    mask = mask.to(dt).contiguous()
    weight = weight.to(dt).contiguous()
    bias = bias.to(dt).contiguous()
    out = _prepare_out("modulated_deform_conv2d", out, (N, OC, Ho, Wo), x)
    if out.numel() == 0:
        return out
    if impl == "direct":
        _launch("dcn", f"dcn_direct_{kind}", _grid1(N * OC * Ho * Wo),
                (x, offset, mask, weight, bias, N, C, H, W, OC, KH, KW, Ho, Wo, sh, sw, ph, pw, dh, dw, groups,
                 deform_groups, out), x.device)
        return out
    if impl != "im2col":
        raise ValueError(f"modulated_deform_conv2d: impl must be 'im2col' or 'direct', got {impl!r}")
    cols = torch.empty((N, C * K, Ho * Wo), dtype=dt, device=x.device)
    cpt = 4 if (C // deform_groups) % 4 == 0 else 1
    _launch("dcn", f"dcn_im2col_{kind}_c{cpt}", _grid1(N * (C // cpt) * Ho * Wo),
            (x, offset, mask, N, C, H, W, KH, KW, Ho, Wo, sh, sw, ph, pw, dh, dw, deform_groups, cols), x.device)
    w = weight.view(groups, OC // groups, Cg * K)
    torch.matmul(w, cols.view(N, groups, Cg * K, Ho * Wo), out=out.view(N, groups, OC // groups, Ho * Wo))
    out.add_(bias.view(1, OC, 1, 1))
    return out
