"""Host time of one eager MSDA call: the shipped launch against a peer that builds one ctypes object per argument
and a fresh pointer array per launch (the launch code before the per-thread argument block), in one process.

BEVFormer-tiny decoder call in fp16 (5 us of GPU time, so an eager loop measures the host side); the two
launches alternate 7 times, 3,000 calls each, and must write the same output. Needs a CUDA GPU, torch and CuPy.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time

import numpy as np
import torch

from qdqkit.custom_ops import cuda
from qdqkit.custom_ops.cuda import testing as T


def launch_per_argument(source, kernel, grid, args, device, shared_mem=0):
    """The peer: same kernel lookup and stream, one ctypes object per argument."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn, ptr = cuda._kernel(source, kernel, index, shared_mem)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    holders = [ctypes.c_uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int32(int(a))
               for a in args]
    params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    err = cuda._libcuda().cuLaunchKernel(ptr, grid[0], grid[1], grid[2], cuda._BLOCK, 1, 1, shared_mem,
                                         cuda._raw_stream(index), params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernel failed: {err}")


def main() -> int:
    if not cuda.available():
        print(f"gpu_launch: {cuda.unavailable_reason()}", file=sys.stderr)
        return 2
    B, shapes, M, D, Q, P, G = T.BEVFORMER_TINY_MSDA["decoder"]
    inp = T.msda_inputs(np.random.default_rng(0), B, shapes, M, D, Q, P, G)
    t = [torch.tensor(a, dtype=torch.float16, device="cuda") for a in inp.as_tuple()]
    t[1] = torch.tensor(inp.spatial_shapes, device="cuda")
    out = torch.empty(B, Q, M, D, dtype=torch.float16, device="cuda")
    ref = cuda.ms_deform_attn(*t).clone()
    shipped = cuda._launch
    res = {"shipped": [], "per-argument": []}
    try:
        for _ in range(7):
            for name, fn in (("per-argument", launch_per_argument), ("shipped", shipped)):
                cuda._launch = fn
                for _ in range(100):
                    cuda.ms_deform_attn(*t, out=out)
                torch.cuda.synchronize()
                n = 3000
                t0 = time.perf_counter()
                for _ in range(n):
                    cuda.ms_deform_attn(*t, out=out)
                torch.cuda.synchronize()
                res[name].append(1e6 * (time.perf_counter() - t0) / n)
                if not torch.equal(out, ref):
                    raise AssertionError(f"{name} launch wrote a different output")
    finally:
        cuda._launch = shipped
    for name, v in res.items():
        print(f"{name:13} median {statistics.median(v):.1f} us a call  ({' '.join(f'{x:.1f}' for x in v)})")
    print(f"shipped / per-argument: {statistics.median(res['shipped']) / statistics.median(res['per-argument']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
