"""Runs each MSDA form (and the INT8 kernel) once at the BEVFormer-tiny shapes, for Nsight Compute to profile (see gpu_run.sh, stage ncu).

Not a timing script: ncu replays each kernel and reports throughput and occupancy figures that say what bounds
it (issue, latency, L1/shared memory, L2 or DRAM).
"""

import argparse

import numpy as np
import torch

from qdqkit.custom_ops import cuda
from qdqkit.custom_ops.cuda import testing as T

CASES = ("tsa", "sca", "decoder")
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("cases", nargs="*", help=f"MSDA calls to run, of {', '.join(CASES)} (default: all three)")
cases = ap.parse_args().cases or CASES
if set(cases) - set(CASES):
    ap.error(f"unknown case(s) {sorted(set(cases) - set(CASES))}; choose from {', '.join(CASES)}")
rng = np.random.default_rng(0)
for name in cases:
    B, shapes, M, D, Q, P, G = T.BEVFORMER_TINY_MSDA[name]
    inp = T.msda_inputs(rng, B, shapes, M, D, Q, P, G)
    for dt in (torch.float16, torch.float32):
        args = [torch.tensor(a, dtype=dt, device="cuda") for a in inp.as_tuple()]
        args[1] = torch.tensor(inp.spatial_shapes, device="cuda")
        for strategy in ("global", "smem"):
            if strategy == "smem" and sum(h * w for h, w in shapes) * D * args[0].element_size() > 200 * 1024:
                continue
            cuda.ms_deform_attn(*args, strategy=strategy)
        cuda.ms_deform_attn(*args, strategy="global", _coop=False)
        cuda.ms_deform_attn(*args, strategy="global", _coop=True)
        if dt == torch.float16:
            cuda.ms_deform_attn(*args, strategy="global", _packed=True)
    q8 = [torch.tensor(T.quantize_int8(a)[0], device="cuda") for a in (inp.value, inp.sampling_offsets,
                                                                       inp.attention_weights)]
    for packed in (False, True):
        cuda.ms_deform_attn_int8(q8[0], torch.tensor(inp.spatial_shapes, device="cuda"),
                                 torch.tensor(inp.reference_points, dtype=torch.float32, device="cuda"), q8[1], q8[2],
                                 value_scale=0.02, offset_scale=0.05, weight_scale=0.03, out_scale=0.01,
                                 _packed=packed)
torch.cuda.synchronize()
print("profiled kernels ran")
