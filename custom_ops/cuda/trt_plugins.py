"""TensorRT plugin definitions of BEVFormer's ops through TensorRT's Python plugin API (``tensorrt.plugin``).

Each op is registered as a quickly deployable plugin whose name equals its ONNX op type
(``MultiScaleDeformableAttnTRT2``, ``RotateTRT2``, ``ModulatedDeformableConv2dTRT2`` and the non-2 names),
under a namespace (default ``qdqkit``; QDP namespaces cannot be empty and cannot contain '.'). The
implementation is ahead-of-time (``aot_impl``): it returns the PTX of this package's kernels, the launch
geometry and the int32 extra arguments as symbolic expressions of the input shapes, so a built engine needs
no Python at run time. ONNX nodes reach these plugins when they carry ``plugin_namespace="qdqkit"`` (or that
domain) and are parsed in a process that called :func:`register` first.

``tensorrt`` is imported only inside :func:`register`. Everything TensorRT-independent (which kernel, grid,
block and extras a given shape gets) lives in the ``*_launch`` functions, which take plain ints as well as
TensorRT's symbolic sizes; the GPU tests launch the very PTX that :func:`register` would embed through the
CUDA driver API with exactly these launches, in TensorRT's argument order (tensor inputs, int32 extras,
tensor outputs).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

from qdqkit.errors import UserError

from . import _WIDE_VEC, _build, use_coop

BLOCK = 256
ROTATE_CHANNELS_PER_THREAD = 8  # QK_ROTATE_RC in rotate.cu
DEFAULT_NAMESPACE = "qdqkit"
PTX_ARCH = "compute_80"

MSDA_NAMES = ("MultiScaleDeformableAttnTRT2", "MultiScaleDeformableAttnTRT")
ROTATE_NAMES = ("RotateTRT2", "RotateTRT")
DCN_NAMES = ("ModulatedDeformableConv2dTRT2", "ModulatedDeformableConv2dTRT")


class TensorRTUnavailable(UserError):
    """TensorRT's Python plugin API (``tensorrt.plugin`` with ahead-of-time support, TensorRT >= 10.9) is missing."""


def _int_cdiv(a, b):
    return (a + b - 1) // b


def float_bits(x: float) -> int:
    """The int32 whose bits are the fp32 ``x`` (how a float scale travels through TensorRT's int extras)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


@dataclass
class Launch:
    """One kernel launch of the AOT ABI: ``kernel(inputs..., *extras, outputs...)`` on ``grid`` x ``block``."""

    source: str
    kernel: str
    grid: Tuple
    block: Tuple[int, int, int]
    extras: List
    shared_mem: int = 0


SMEM_QCHUNK = 128
SMEM_LIMIT = 48 * 1024  # no opt-in attribute can be set on a TensorRT AOT kernel, so stay under the default


def msda_launch(dtype: str, value_shape: Sequence, num_levels, ref_last, weights_last, num_queries,
                cdiv: Callable = _int_cdiv, scales: Sequence[float] = (), form: str = "auto") -> Launch:
    """Launch of MultiScaleDeformableAttn: dtype "fp32" | "fp16" | "int8"; ``value_shape`` (B, S, M, D) with a
    concrete D; sizes may be ints or symbolic. For int8, ``scales`` are (value, offsets, weights, output).
    ``form`` "smem" stages each (b, m) value slice in shared memory (needs a concrete S with S*D*size <= 48 KB),
    "global" gathers through the caches; "auto" is "global", as for PyTorch (see msda.cu). Single-level calls
    with 4 or 8 points take the compile-time-point kernels with the channel split PyTorch uses, and the cooperative
    kernels by PyTorch's rule (use_coop). PyTorch's packed form (use_packed: a copy of value into a workspace, then
    a gather) is not available here: a TensorRT AOT plugin returns one kernel and one launch and has no workspace
    (IPluginV3QuickAOTBuild: getKernel / getLaunchParams), so those calls keep the cooperative kernel."""
    B, S, M, D = value_shape
    D = int(D)
    L = num_levels
    P = weights_last // L
    G = ref_last // 2
    if dtype == "int8":
        if D % 8:
            raise ValueError(f"INT8 MultiScaleDeformableAttn needs D % 8 == 0, got D={D}")
        vec, kernel = 8, "msda_int8_v8"
    elif dtype == "fp16":
        vec = 8 if D % 8 == 0 else (2 if D % 2 == 0 else 1)
        kernel = f"msda_fp16_v{vec}"
    elif dtype == "fp32":
        vec = 4 if D % 4 == 0 else 1
        kernel = f"msda_fp32_v{vec}"
    else:
        raise ValueError(f"unsupported MultiScaleDeformableAttn type {dtype}")
    def const_of(e):
        return e if isinstance(e, int) else (e.constant_value if getattr(e, "is_constant", False) else None)

    groups = None
    if all(const_of(e) is not None for e in (B, num_queries, M)):
        groups = const_of(B) * const_of(num_queries) * const_of(M)
    lp = const_of(weights_last)
    single = const_of(L) == 1 and lp in (4, 8) and vec in (4, 8)
    if single and form != "smem" and use_coop(dtype, D, 1, lp, groups):
        # the cooperative kernels (msda.cu, msda_co_*; the narrow split), by the rule PyTorch's launches follow
        kernel = f"msda_co_lp{lp}_{dtype}"
    elif single:
        if dtype != "int8":
            wide = _WIDE_VEC[(dtype, lp)]
            if D % wide == 0:
                vec = wide
            kernel = f"msda_{dtype}_v{vec}"
        kernel = kernel.replace("msda_", f"msda_lp{lp}_", 1)
    esize = {"fp32": 4, "fp16": 2, "int8": 1}[dtype]
    s_const = const_of(S)
    fits = s_const is not None and s_const * D * esize <= SMEM_LIMIT
    if form == "smem" and not fits:
        raise ValueError("the shared-memory MSDA form needs a constant S with S*D*size <= 48 KB")
    use_smem = form == "smem"
    quant = [float_bits(s) for s in scales] if dtype == "int8" else []
    if use_smem:
        extras = [B, S, M, D, num_queries, L, P, G, SMEM_QCHUNK] + quant
        launch = Launch("msda", kernel.replace("msda_", "msda_smem_", 1),
                        (cdiv(num_queries, SMEM_QCHUNK), B * M, 1), (BLOCK, 1, 1), extras)
        launch.shared_mem = s_const * D * esize
        return launch
    extras = [B, S, M, D, num_queries, L, P, G] + quant
    threads = B * num_queries * M * (D // vec)
    return Launch("msda", kernel, (cdiv(threads, BLOCK), 1, 1), (BLOCK, 1, 1), extras)


def rotate_launch(dtype: str, img_shape: Sequence, interpolation: int, cdiv: Callable = _int_cdiv) -> Launch:
    """Launch of Rotate for img (C, H, W) (ints or symbolic), dtype "fp32" | "fp16"."""
    C, H, W = img_shape
    return Launch("rotate", f"rotate_{dtype}", (cdiv(H * W, BLOCK), cdiv(C, ROTATE_CHANNELS_PER_THREAD), 1),
                  (BLOCK, 1, 1), [C, H, W, int(interpolation)])


def dcn_output_hw(H, W, KH, KW, stride, padding, dilation):
    """(Ho, Wo) of a convolution; works on ints and on TensorRT's symbolic sizes."""
    Ho = (H + 2 * int(padding[0]) - (int(dilation[0]) * (KH - 1) + 1)) // int(stride[0]) + 1
    Wo = (W + 2 * int(padding[1]) - (int(dilation[1]) * (KW - 1) + 1)) // int(stride[1]) + 1
    return Ho, Wo


def dcn_launch(dtype: str, x_shape: Sequence, weight_shape: Sequence, stride, padding, dilation, groups: int,
               deform_groups: int, cdiv: Callable = _int_cdiv) -> Launch:
    """Launch of the single-kernel ModulatedDeformableConv2d (``dcn_direct_*``; PTX cannot call cuBLAS)."""
    N, C, H, W = x_shape
    OC, _, KH, KW = weight_shape
    Ho, Wo = dcn_output_hw(H, W, KH, KW, stride, padding, dilation)
    extras = [N, C, H, W, OC, KH, KW, Ho, Wo, int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]),
              int(dilation[0]), int(dilation[1]), int(groups), int(deform_groups)]
    return Launch("dcn", f"dcn_direct_{dtype}", (cdiv(N * OC * Ho * Wo, BLOCK), 1, 1), (BLOCK, 1, 1), extras)


def ptx(source: str) -> bytes:
    """The PTX that the plugins embed for one kernel source."""
    return _build.compile_ptx(source, PTX_ARCH)


_registered = set()


def register(namespace: str = DEFAULT_NAMESPACE, names: Sequence[str] = MSDA_NAMES + ROTATE_NAMES + DCN_NAMES):
    """Registers the AOT plugins ``namespace::<op type>`` with TensorRT's plugin registry (idempotent).

    Raises :class:`TensorRTUnavailable` (one line) when ``tensorrt.plugin`` with AOT support is missing.
    """
    if not namespace or "." in namespace or namespace in ("trt", "tensorrt"):
        raise UserError(f"TensorRT plugin namespace {namespace!r} is invalid: it must be non-empty, contain no '.', "
                        "and not be 'trt' or 'tensorrt'")
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as exc:  # ImportError, or an OSError from missing libnvinfer
        raise TensorRTUnavailable(f"TensorRT plugins need TensorRT >= 10.9 with its Python plugin API "
                                  f"(pip install 'qdqkit[trt]'): {exc}") from None
    if not hasattr(trtp, "aot_impl"):
        raise TensorRTUnavailable("TensorRT plugins need ahead-of-time plugin support (tensorrt.plugin.aot_impl, "
                                  "TensorRT >= 10.9); upgrade TensorRT")
    import numpy as np
    import numpy.typing as npt

    def kind(dt) -> str:
        return {trt.float32: "fp32", trt.float16: "fp16", trt.int8: "int8"}[dt]

    def const(e, what):
        if not e.is_constant:
            raise ValueError(f"{what} must be a build-time constant")
        return e.constant_value

    def finish(launch: Launch):
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch.grid
        params.block_x, params.block_y, params.block_z = launch.block
        params.shared_mem = launch.shared_mem
        extras = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in launch.extras])
        return launch.kernel.encode(), ptx(launch.source), params, extras

    def define_msda(name):
        pid = f"{namespace}::{name}"

        @trtp.register(pid)
        def desc(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, reference_points: trtp.TensorDesc,
                 sampling_offsets: trtp.TensorDesc, attention_weights: trtp.TensorDesc) -> trtp.TensorDesc:
            v, o = value.shape_expr, sampling_offsets.shape_expr
            return trtp.from_shape_expr((v[0], o[1], v[2], v[3]), dtype=value.dtype)

        @trtp.autotune(pid)
        def tune(value, spatial_shapes, reference_points, sampling_offsets, attention_weights, outputs):
            return [
                trtp.AutoTuneCombination("FP32|FP16, INT64, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR"),
                trtp.AutoTuneCombination("INT8, INT64, FP32, INT8, INT8, INT8", "LINEAR"),
            ]

        @trtp.aot_impl(pid)
        def aot(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, reference_points: trtp.TensorDesc,
                sampling_offsets: trtp.TensorDesc, attention_weights: trtp.TensorDesc,
                outputs: Tuple[trtp.TensorDesc], tactic: int):
            v = value.shape_expr
            dt = kind(value.dtype)
            scales = ()
            if dt == "int8":
                scales = (value.scale, sampling_offsets.scale, attention_weights.scale, outputs[0].scale)
                if not all(s is not None and s > 0 for s in scales):
                    raise ValueError(f"{name}: INT8 I/O needs valid per-tensor scales, got {scales}")
            launch = msda_launch(dt, (v[0], v[1], v[2], const(v[3], f"{name} channel count D")),
                                 spatial_shapes.shape_expr[0], reference_points.shape_expr[3],
                                 attention_weights.shape_expr[3], sampling_offsets.shape_expr[1],
                                 cdiv=trtp.cdiv, scales=scales)
            return finish(launch)

    def define_rotate(name):
        pid = f"{namespace}::{name}"

        @trtp.register(pid)
        def desc(img: trtp.TensorDesc, angle: trtp.TensorDesc, center: trtp.TensorDesc,
                 interpolation: int) -> trtp.TensorDesc:
            return img.like()

        @trtp.autotune(pid)
        def tune(img, angle, center, outputs):
            return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR")]

        @trtp.aot_impl(pid)
        def aot(img: trtp.TensorDesc, angle: trtp.TensorDesc, center: trtp.TensorDesc, interpolation: int,
                outputs: Tuple[trtp.TensorDesc], tactic: int):
            return finish(rotate_launch(kind(img.dtype), tuple(img.shape_expr), interpolation, cdiv=trtp.cdiv))

    def define_dcn(name):
        pid = f"{namespace}::{name}"

        @trtp.register(pid)
        def desc(x: trtp.TensorDesc, offset: trtp.TensorDesc, mask: trtp.TensorDesc, weight: trtp.TensorDesc,
                 bias: trtp.TensorDesc, stride: npt.NDArray[np.int32], padding: npt.NDArray[np.int32],
                 dilation: npt.NDArray[np.int32], groups: int, deform_groups: int) -> trtp.TensorDesc:
            xs, ws = x.shape_expr, weight.shape_expr
            Ho, Wo = dcn_output_hw(xs[2], xs[3], ws[2], ws[3], stride, padding, dilation)
            return trtp.from_shape_expr((xs[0], ws[0], Ho, Wo), dtype=x.dtype)

        @trtp.autotune(pid)
        def tune(x, offset, mask, weight, bias, outputs):
            return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16",
                                             "LINEAR")]

        @trtp.aot_impl(pid)
        def aot(x: trtp.TensorDesc, offset: trtp.TensorDesc, mask: trtp.TensorDesc, weight: trtp.TensorDesc,
                bias: trtp.TensorDesc, stride: npt.NDArray[np.int32], padding: npt.NDArray[np.int32],
                dilation: npt.NDArray[np.int32], groups: int, deform_groups: int,
                outputs: Tuple[trtp.TensorDesc], tactic: int):
            return finish(dcn_launch(kind(x.dtype), tuple(x.shape_expr), tuple(weight.shape_expr), stride, padding,
                                     dilation, groups, deform_groups, cdiv=trtp.cdiv))

    for name in names:
        if (namespace, name) in _registered:
            continue
        if name in MSDA_NAMES:
            define_msda(name)
        elif name in ROTATE_NAMES:
            define_rotate(name)
        elif name in DCN_NAMES:
            define_dcn(name)
        else:
            raise UserError(f"no TensorRT plugin definition for op type {name!r}; known: "
                            f"{', '.join(MSDA_NAMES + ROTATE_NAMES + DCN_NAMES)}")
        _registered.add((namespace, name))
