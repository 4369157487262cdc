"""Turning the kernel sources of this package into something a GPU runs.

One source per op (``msda.cu``, ``rotate.cu``, ``dcn.cu``) with ``extern "C"`` kernels whose parameters follow
TensorRT's ahead-of-time plugin ABI. The same text is compiled

* by NVRTC through CuPy (:func:`module`) for the PyTorch path: about a second per source on a fresh machine,
  with no build tree, no compiler toolchain and no ABI coupling to the installed torch;
* to PTX (:func:`compile_ptx`) for TensorRT plugins and for the check that launches that very PTX through the
  CUDA driver API with TensorRT's argument order.

Nothing here imports CuPy or the CUDA bindings until a compile is asked for.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile

SOURCES = ("msda", "rotate", "dcn")
_HERE = os.path.dirname(os.path.abspath(__file__))
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def source_path(name: str) -> str:
    """Path of the ``.cu`` file of the op source ``name`` (one of :data:`SOURCES`)."""
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; expected one of {', '.join(SOURCES)}")
    return os.path.join(_HERE, f"{name}.cu")


@functools.lru_cache(maxsize=None)
def source(name: str) -> str:
    """The self-contained text of a source: local ``#include "..."`` lines are replaced by the file.

    Inlining spares every compiler (NVRTC through CuPy, NVRTC through cuda-python, nvcc) an include path.
    """

    def expand(text: str, seen: frozenset) -> str:
        def repl(match: re.Match) -> str:
            inc = match.group(1)
            if inc in seen:
                return ""
            with open(os.path.join(_HERE, inc), encoding="utf-8") as fh:
                return expand(fh.read(), seen | {inc})

        return _INCLUDE.sub(repl, text)

    with open(source_path(name), encoding="utf-8") as fh:
        return expand(fh.read(), frozenset())


_NVRTC_OPTIONS = ("--std=c++17",)


@functools.lru_cache(maxsize=None)
def _module_cached(name: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(code=source(name), options=_NVRTC_OPTIONS, backend="nvrtc")
        mod.compile()
    return mod


def module(name: str, device_index: int = 0):
    """The compiled CuPy ``RawModule`` of source ``name`` for one device (compiled once per process)."""
    return _module_cached(name, device_index)


def _ptx_with_cuda_bindings(text: str, arch: str) -> bytes:
    try:
        from cuda.bindings import nvrtc
    except ImportError:  # older cuda-python layout
        from cuda import nvrtc  # type: ignore[no-redef]

    def check(result):
        err = result[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC failed: {err}")
        return result[1] if len(result) > 1 else None

    prog = check(nvrtc.nvrtcCreateProgram(text.encode(), b"qdqkit.cu", 0, [], []))
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError("NVRTC compile failed:\n" + log.decode(errors="replace"))
    size = check(nvrtc.nvrtcGetPTXSize(prog))
    ptx = b" " * size
    check(nvrtc.nvrtcGetPTX(prog, ptx))
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\x00")


def _ptx_with_nvcc(text: str, arch: str) -> bytes:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("no PTX compiler: neither cuda-python's NVRTC nor nvcc is available")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.cu")
        out = os.path.join(tmp, "k.ptx")
        with open(src, "w", encoding="utf-8") as fh:
            fh.write(text)
        subprocess.run([nvcc, f"-arch={arch}", "-ptx", "-std=c++17", "-o", out, src], check=True,
                       capture_output=True)
        with open(out, "rb") as fh:
            return fh.read()


@functools.lru_cache(maxsize=None)
def compile_ptx(name: str, arch: str = "compute_80") -> bytes:
    """PTX text of source ``name`` for virtual architecture ``arch`` (NVRTC via cuda-python, else nvcc).

    compute_80 by default: the driver JIT-compiles it for any later GPU, Hopper included, and no kernel here
    needs a newer instruction.
    """
    text = source(name)
    try:
        return _ptx_with_cuda_bindings(text, arch)
    except ImportError:
        return _ptx_with_nvcc(text, arch)
