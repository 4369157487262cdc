"""BEVFormer-tiny full frame on the GPU in PyTorch: FP32 and FP16, with the CUDA kernels and with the plain-PyTorch
(grid_sample) formulation of the custom ops, median latency of each, all in one run.

The formulation path is the model's own forward with ``qdqkit.custom_ops.cuda.available`` reporting False, which
is exactly what a machine without the kernels runs. FP16 is PyTorch autocast (matrix products and convolutions
in fp16, the custom ops in their input dtype); the kernel launches per frame are counted and printed, so a path
that silently fell back would show. Inputs come from the example's synthetic scene generator
(a mid-scene frame, so the temporal path is live) with a random previous BEV; weights are the seeded ones.
Each configuration: 5 warm-up frames, then the median of CUDA-event timings of 30 frames; the two paths are
timed alternately three times and every pass is printed (their spread is the noise). The outputs of the two paths
are compared too (relative L2 of bev_embed), so a fast wrong path would show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch

from qdqkit.custom_ops import cuda


def frame_inputs(cfg, device, dtype):
    try:
        from qdqkit.examples.bevformer.data import SceneGenerator

        sample = SceneGenerator(cfg, seed=0).inputs(3)
        src = "SceneGenerator frame 3"
    except Exception as exc:  # e.g. a device without the example's dependencies: random inputs, and say so
        rng = np.random.default_rng(0)
        sample = {"image": rng.standard_normal((1, cfg.num_cams, 3, cfg.img_h, cfg.img_w)).astype(np.float32),
                  "use_prev_bev": np.ones(1, np.float32), "can_bus": rng.standard_normal(18).astype(np.float32),
                  "lidar2img": np.tile(np.eye(4, dtype=np.float32), (1, cfg.num_cams, 1, 1))}
        src = f"random (SceneGenerator failed: {exc})"
    rng = np.random.default_rng(1)
    prev = rng.standard_normal((cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims)).astype(np.float32)
    image = np.asarray(sample["image"], np.float32).reshape(1, cfg.num_cams, 3, cfg.img_h, cfg.img_w)
    t = lambda a: torch.tensor(np.asarray(a, np.float32), device=device).to(dtype)  # noqa: E731
    return (t(image), t(prev), t(sample["use_prev_bev"]), t(sample["can_bus"]), t(sample["lidar2img"])), src


def time_frames(model, inputs, half: bool, warmup=5, reps=30):
    # The model builds a few constants inside forward with factory calls that name no device (torch.zeros,
    # torch.tensor); defaulting those to the GPU keeps the frame on one device without touching the model.
    with torch.no_grad(), torch.device("cuda"), torch.autocast("cuda", dtype=torch.float16, enabled=half):
        for _ in range(warmup):
            out = model(*inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            out = model(*inputs)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not cuda.available():
        print(f"gpu_frame: {cuda.unavailable_reason()}", file=sys.stderr)
        return 2
    from qdqkit.examples.bevformer.model import TINY, build_model

    real_available = cuda.available
    counts = {}
    for fn_name in ("ms_deform_attn", "rotate"):
        real = getattr(cuda, fn_name)

        def counting(*a, _real=real, _name=fn_name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        setattr(cuda, fn_name, counting)
    rows = []
    note = None
    torch.backends.cudnn.benchmark = True
    model = build_model(TINY, seed=0, calibrate_bn=False).to("cuda")
    inputs, note = frame_inputs(TINY, "cuda", torch.float32)
    for name, half in (("FP32", False), ("FP16 (autocast)", True)):
        res = {}
        outs = {}
        launches = {}
        for rnd in range(3):
            for path in ("kernels", "formulation"):
                cuda.available = real_available if path == "kernels" else (lambda: False)
                counts.clear()
                try:
                    ms, out = time_frames(model, inputs, half)
                finally:
                    cuda.available = real_available
                launches[path] = {k: v // 35 for k, v in counts.items()}  # 5 warm-up + 30 timed frames
                res.setdefault(path, []).append(ms)
                outs[path] = out[0].double()
        diff = float((outs["kernels"] - outs["formulation"]).norm() / outs["formulation"].norm())
        row = {"precision": name, "kernels_ms": res["kernels"], "formulation_ms": res["formulation"],
               "kernel_launches_per_frame": launches, "bev_embed_rel_diff": diff,
               "finite": bool(torch.isfinite(outs["kernels"]).all())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0), "inputs": note, "rows": rows}, fh, indent=1)
    print(f"\nBEVFormer-tiny full frame, {torch.cuda.get_device_name(0)}, torch {torch.__version__}; inputs: {note}")
    print("| precision | with CUDA kernels (ms) | with grid_sample formulation (ms) | ratio | bev_embed rel. diff |")
    print("|---|---|---|---|---|")
    # each cell: median of the three passes (each pass itself the median of 30 frames), then every pass
    for r in rows:
        k, f = statistics.median(r["kernels_ms"]), statistics.median(r["formulation_ms"])
        print(f"| {r['precision']} | {k:.2f} ({', '.join(f'{v:.2f}' for v in r['kernels_ms'])}) | {f:.2f} "
              f"({', '.join(f'{v:.2f}' for v in r['formulation_ms'])}) | {f / k:.2f}x | {r['bev_embed_rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
