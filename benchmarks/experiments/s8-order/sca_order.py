"""Session 8 experiment (issue 6): does the order in which threads take (b, q, m) groups decide how often the
spatial cross-attention's corner reads hit L1?

The cooperative kernel (`msda_co_lp8_fp16`) gives a warp 8 groups = one query and its 8 heads, and a block of 256
threads 8 queries x 8 heads; each head samples its own (b, m) slice of value (375 cells x 64 bytes, the cells
512 bytes apart), so an SM's resident blocks touch every head's slice of several cameras at once and L1 holds little
of it (Nsight Compute: 29% of the sectors hit). Here the same body runs with the groups reordered: HP heads of one
(b, m..m+HP-1) slice and consecutive queries in a block, so a block's reads stay within one slice (two heads share
a 128-byte line with HP = 2); bigger blocks put more queries of one slice on an SM; "swz" numbers the blocks so
that those an SM holds at once (blocks j, j + #SM, ... under the first wave's round-robin) are consecutive work.
Every variant must give the shipped kernel's output bit for bit (same arithmetic, other threads).

Not part of the package: it compiles a modified copy of msda.cu text (the shipped file is not touched) and times
the variants with benchmarks/gpu_ops.py's graph-replay method, inputs rotated over >160 MB, all in one run.
Run it with `bash benchmarks/experiments/s8-order/run.sh` on the GPU machine.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from gpu_ops import n_sets, nbytes, time_graph
from qdqkit.custom_ops import cuda
from qdqkit.custom_ops.cuda import _build
from qdqkit.custom_ops.cuda import testing as T

HEAD = """template <typename TV, typename TR, typename TP, int VEC, bool QUANT, int LP>
__device__ __forceinline__ void msda_coop("""
MAP = """    const long long total = (long long)B * Q * M * TPG;
    const long long tid0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = tid0 < total;
    const long long tid = active ? tid0 : total - 1;
    const int lane = (int)(tid % TPG);
    const long long bqm = tid / TPG;
    const int m = (int)(bqm % M);
    const long long bq = bqm / M;
    const int b = (int)(bq / Q);
"""
NEW_MAP = """    const long long total = (long long)B * Q * M * TPG;
    int lane, m, b;
    long long bq;
    bool active;
    if constexpr (TWO_D) {  // blockIdx.y = slice (b, head block), x over its queries: 32-bit, no runtime division
        constexpr int MP = 8 / HP;  // M = 8 (BEVFormer-tiny; the host checks)
        b = blockIdx.y / MP;
        const int mp = blockIdx.y - b * MP;
        const int t = blockIdx.x * blockDim.x + threadIdx.x;
        lane = t % TPG;
        const int grp = t / TPG;
        const int q0 = grp / HP;
        active = q0 < Q;
        m = mp * HP + grp % HP;
        bq = (long long)b * Q + (active ? q0 : Q - 1);
    } else {
        long long blk = blockIdx.x;
        if constexpr (SWZ) {  // blocks j, j + NSM, ... take consecutive work
            const long long k = gridDim.x / QK_NSM;
            blk = (long long)(blockIdx.x % QK_NSM) * k + blockIdx.x / QK_NSM;
            if (blk * blockDim.x >= total) return;  // whole block: no shuffle partner is left waiting
        }
        const long long tid0 = blk * blockDim.x + threadIdx.x;
        active = tid0 < total;
        const long long tid = active ? tid0 : total - 1;
        lane = (int)(tid % TPG);
        const long long grp = tid / TPG;
        if constexpr (HP == 0) {  // the shipped order: heads fastest, then queries
            m = (int)(grp % M);
            bq = grp / M;
        } else {  // HP heads fastest, then queries, then the slice (b, head block)
            const int mh = (int)(grp % HP);
            const long long r = grp / HP;
            const int q = (int)(r % Q);
            const long long bmp = r / Q;
            const int mp = M / HP;
            m = (int)(bmp % mp) * HP + mh;
            bq = (bmp / mp) * Q + q;
        }
        b = (int)(bq / Q);
    }
    const long long bqm = bq * M + m;
"""
KERNELS = """
#define QK_X(NAME, HP, SWZ, TWO_D, BOUNDS)                                                                        \\
    extern "C" __global__ void __launch_bounds__ BOUNDS msda_x_##NAME(                                      \\
        const qk_half* value, const qk_i64* shapes, const qk_half* ref, const qk_half* off, const qk_half* aw, \\
        int B, int S, int M, int D, int Q, int L, int P, int G, qk_half* out) {                            \\
        msda_coop<qk_half, qk_half, qk_half, 8, false, 8, HP, SWZ, TWO_D>(value, shapes, ref, off, aw, B, S, M, Q, G, \\
                                                                 1.f, 1.f, 1.f, 1.f, out);                  \\
    }
"""
# name: (HP, swizzle, block threads, 2-D grid); the first session-8 call timed all but the 2-D ones
VARIANTS = {
    "hp0_b256": (0, 0, 256, 0), "hp1_b256": (1, 0, 256, 0), "hp2_b256": (2, 0, 256, 0), "hp4_b256": (4, 0, 256, 0),
    "hp1_b512": (1, 0, 512, 0), "hp2_b512": (2, 0, 512, 0), "hp1_b1024": (1, 0, 1024, 0),
    "hp2_b1024": (2, 0, 1024, 0), "hp1_b256_swz": (1, 1, 256, 0), "hp2_b256_swz": (2, 1, 256, 0),
    "hp2_b512_swz": (2, 1, 512, 0),
    "2d_hp1_b256": (1, 0, 256, 1), "2d_hp2_b256": (2, 0, 256, 1), "2d_hp4_b256": (4, 0, 256, 1),
    "2d_hp8_b256": (8, 0, 256, 1), "2d_hp2_b128": (2, 0, 128, 1), "2d_hp2_b512": (2, 0, 512, 1),
}
SELECT = os.environ.get("S8_VARIANTS")  # space-separated subset to time (default: all)


def source(nsm: int) -> str:
    text = _build.source("msda")
    assert text.count(HEAD) == 1 and text.count(MAP) == 1
    text = text.replace(HEAD, HEAD.replace("int LP>", "int LP, int HP = 0, bool SWZ = false, bool TWO_D = false>"))
    text = text.replace(MAP, NEW_MAP)
    text = f"#define QK_NSM {nsm}\n" + text + KERNELS
    for name, (hp, swz, bs, two_d) in VARIANTS.items():
        text += f"QK_X({name}, {hp}, {'true' if swz else 'false'}, {'true' if two_d else 'false'}, ({bs}))\n"
    return text


class Launcher:
    def __init__(self, text: str):
        import cupy

        self.mod = cupy.RawModule(code=text, options=("--std=c++17",), backend="nvrtc")
        self.mod.compile()
        self.lib = cuda._libcuda()
        self.nsm = torch.cuda.get_device_properties(0).multi_processor_count

    def regs(self, name: str) -> int:
        return self.mod.get_function(f"msda_x_{name}").num_regs

    def __call__(self, name: str, args) -> None:
        hp, swz, bs, two_d = VARIANTS[name]
        B, M, Q = args[5], args[7], args[9]
        blocks, rows = -(-(B * Q * M * 4) // bs), 1
        if swz:
            blocks = -(-blocks // self.nsm) * self.nsm
        if two_d:
            assert M == 8
            blocks, rows = -(-(Q * hp * 4) // bs), B * M // hp
        fn = self.mod.get_function(f"msda_x_{name}")
        values = (ctypes.c_uint64 * len(args))()
        for i, a in enumerate(args):
            values[i] = a.data_ptr() if isinstance(a, torch.Tensor) else int(a) & 0xFFFFFFFF
        base = ctypes.addressof(values)
        params = (ctypes.c_void_p * len(args))(*[base + 8 * i for i in range(len(args))])
        err = self.lib.cuLaunchKernel(int(fn.kernel.ptr), blocks, rows, 1, bs, 1, 1, 0,
                                      torch.cuda.current_stream().cuda_stream, params, None)
        assert err == 0, err


def main() -> None:
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    launch = Launcher(source(nsm))
    only = os.environ.get("S8_ONLY")  # under Nsight Compute: one variant and the shipped kernel, one set
    B, shapes, M, D, Q, P, G = T.BEVFORMER_TINY_MSDA["sca"]
    rng = np.random.default_rng(8)
    dt = torch.float16
    dev_sh = torch.tensor(shapes, device="cuda")
    S = shapes[0][0] * shapes[0][1]

    def make():
        inp = T.msda_inputs(rng, B, shapes, M, D, Q, P, G)
        return [torch.tensor(a, dtype=dt, device="cuda") for a in
                (inp.value, inp.reference_points, inp.sampling_offsets, inp.attention_weights)] + \
            [torch.empty(B, Q, M, D, dtype=dt, device="cuda")]

    one = make()
    k = 1 if only else n_sets(nbytes(*one))
    sets = [one] + [make() for _ in range(k - 1)]

    def args(s):
        return (s[0], dev_sh, s[1], s[2], s[3], B, S, M, D, Q, 1, P, G, s[4])

    # correctness: every variant equals the shipped kernel bit for bit, outputs poisoned first
    s = sets[0]
    s[4].fill_(float("nan"))
    cuda.ms_deform_attn(s[0], dev_sh, s[1], s[2], s[3], out=s[4], strategy="global", _coop=True)
    want = s[4].clone()
    torch.cuda.synchronize()
    names = SELECT.split() if SELECT else list(VARIANTS)
    for name in names if not only else [only]:
        s[4].fill_(float("nan"))
        launch(name, args(s))
        torch.cuda.synchronize()
        same = bool(torch.equal(s[4].view(torch.int16), want.view(torch.int16)))
        print(f"{name}: registers {launch.regs(name)}, equal to the shipped kernel: {same}", flush=True)
        assert same, name
    if only:
        return
    rows = []
    shipped = [lambda s=s: cuda.ms_deform_attn(s[0], dev_sh, s[1], s[2], s[3], out=s[4], strategy="global",
                                               _coop=True) for s in sets]
    # shipped first and last, so a drift over the run shows
    order = ["shipped"] + names + ["shipped"]
    for rnd in range(2):
        for name in order:
            calls = shipped if name == "shipped" else [lambda s=s, n=name: launch(n, args(s)) for s in sets]
            t1, t2 = time_graph(calls)
            rows.append({"round": rnd, "variant": name, "us": t1, "us_repeat": t2})
            print(f"round {rnd} {name:14s} {t1:6.2f} {t2:6.2f} us", flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "sca_order.json"), "w") as fh:
        json.dump({"sets": k, "nsm": nsm, "rows": rows}, fh, indent=1)
    print("median over both rounds (us):")
    for name in ["shipped"] + names:
        v = sorted(r["us"] for r in rows if r["variant"] == name)
        print(f"  {name:14s} {np.median(v):6.2f}  (min {v[0]:.2f}, max {v[-1]:.2f})")


if __name__ == "__main__":
    main()
