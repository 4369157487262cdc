"""BEVFormer-tiny full frame on the GPU in PyTorch: FP32 and FP16, with the CUDA kernels and with the plain-PyTorch
(grid_sample) formulation of the custom ops, median latency of each, all in one run.

The formulation path is the model's own forward with ``qdqkit.custom_ops.cuda.available`` reporting False, which
is exactly what a machine without the kernels runs. FP16 is PyTorch autocast (matrix products and convolutions
in fp16, the custom ops in their input dtype). Inputs come from the example's synthetic scene generator (a
mid-scene frame, so the temporal path is live) with a random previous BEV; weights are the seeded ones.

Two ways of running a frame, each timed for both paths:
  * eager: the model's forward called from Python, as a user's loop runs it. A frame launches hundreds of small
    kernels, so this measures mostly host (Python and launch) time, and it moves between runs.
  * graph: the same forward captured once into a CUDA graph and replayed, which takes the host out and leaves
    the GPU's own time for the frame: the figure in which the custom ops' cost shows.
Each (precision, path, way): median of CUDA-event timings of 30 frames after warm-up; the two paths alternate
three times and every pass is printed (their spread is the noise). Kernel launches per frame are counted (in the
eager frames and during the capture), so a path that silently fell back would show, and the outputs are compared
(relative L2 of bev_embed: kernels against formulation, and each graph replay against its own eager frame).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch

from gpu_ops import events_median  # this folder's op benchmark: CUDA-event medians
from qdqkit.custom_ops import cuda

_COUNTED = ("ms_deform_attn", "rotate")


def frame_inputs(cfg, device, dtype):
    """The example's scene generator's frame 3 (mid-scene, so the temporal path is live) and a random previous BEV,
    as tensors in the model's input order."""
    from qdqkit.examples.bevformer.data import INPUT_NAMES, SceneGenerator

    sample = SceneGenerator(cfg, seed=0).inputs(3)
    sample["prev_bev"] = np.random.default_rng(1).standard_normal((cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims))
    inputs = tuple(torch.tensor(np.asarray(sample[k], np.float32), device=device).to(dtype) for k in INPUT_NAMES)
    return inputs, "SceneGenerator frame 3"


def _autocast(half: bool):
    # no weight-cast cache: a graph must not capture casts that a later replay would skip (torch's advice for capture)
    return torch.autocast("cuda", dtype=torch.float16, enabled=half, cache_enabled=False)


def _median_ms(run, reps: int) -> float:
    return events_median(run, reps, 1) / 1000.0


class EagerFrame:
    """The forward called from Python each frame. The model runs on the GPU as built: its spatial shapes stay host
    constants (what the CUDA wrapper uploads once and the formulation reads without a device round trip)."""

    def __init__(self, model, inputs, half: bool, counts: dict, warmup: int = 5):
        self.model, self.inputs, self.half = model, inputs, half
        self.out = None
        self.run()
        for _ in range(warmup - 1):
            self.run()
        counts.clear()
        self.run()
        torch.cuda.synchronize()
        self.launches = dict(counts)

    def run(self):
        with torch.no_grad(), _autocast(self.half):
            self.out = self.model(*self.inputs)

    def time(self, reps: int = 30) -> float:
        return _median_ms(self.run, reps)


class GraphFrame:
    """One forward captured into a CUDA graph (after warm-up frames on a side stream, so that cuDNN's algorithm
    search and the kernels' first-use compilation happen before the capture), then replayed."""

    def __init__(self, model, inputs, half: bool, counts: dict, warmup: int = 3):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), _autocast(half):
            for _ in range(warmup):
                model(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        counts.clear()
        with torch.no_grad(), _autocast(half), torch.cuda.graph(self.graph):
            self.out = model(*inputs)
        self.launches = dict(counts)
        for _ in range(warmup):
            self.graph.replay()
        torch.cuda.synchronize()

    def time(self, reps: int = 30) -> float:
        return _median_ms(self.graph.replay, reps)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    if not cuda.available():
        print(f"gpu_frame: {cuda.unavailable_reason()}", file=sys.stderr)
        return 2
    from qdqkit.examples.bevformer.model import TINY, build_model

    real_available = cuda.available
    counts: dict = {}
    for fn_name in _COUNTED:
        real = getattr(cuda, fn_name)

        def counting(*a, _real=real, _name=fn_name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        setattr(cuda, fn_name, counting)

    def on_path(path, fn, *fn_args):
        cuda.available = real_available if path == "kernels" else (lambda: False)
        try:
            return fn(*fn_args)
        finally:
            cuda.available = real_available

    torch.backends.cudnn.benchmark = True
    model = build_model(TINY, seed=0, calibrate_bn=False).to("cuda")
    inputs, note = frame_inputs(TINY, "cuda", torch.float32)
    paths = ("kernels", "formulation")
    rows = []
    for name, half in (("FP32", False), ("FP16 (autocast)", True)):
        row = {"precision": name}
        frames = {}
        for way, make in (("eager", EagerFrame), ("graph", GraphFrame)):
            for path in paths:
                try:
                    frames[way, path] = on_path(path, make, model, inputs, half, counts)
                except Exception as exc:  # a capture that fails is a result to print, not a crash of the run
                    row[f"{way}_{path}_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"{name} {way} {path}: {row[f'{way}_{path}_error']}", flush=True)
            for _ in range(args.rounds):
                for path in paths:
                    if (way, path) in frames:
                        ms = on_path(path, frames[way, path].time, args.reps)
                        row.setdefault(f"{way}_{path}_ms", []).append(ms)
            for path in paths:
                if (way, path) in frames:
                    row[f"{way}_{path}_launches"] = frames[way, path].launches
        outs = {key: f.out[0] for key, f in frames.items()}
        for way in ("eager", "graph"):
            if (way, "kernels") in outs and (way, "formulation") in outs:
                row[f"{way}_bev_embed_rel_diff"] = _rel(outs[way, "kernels"], outs[way, "formulation"])
        for path in paths:
            if ("graph", path) in outs and ("eager", path) in outs:
                row[f"graph_vs_eager_{path}_rel_diff"] = _rel(outs["graph", path], outs["eager", path])
        row["finite"] = bool(all(torch.isfinite(o).all() for o in outs.values()))
        rows.append(row)
        print(json.dumps(row), flush=True)
        frames.clear()
        outs.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "inputs": note,
                       "rows": rows}, fh, indent=1)
    print(f"\nBEVFormer-tiny full frame, {torch.cuda.get_device_name(0)}, torch {torch.__version__}; inputs: {note}")
    print("each cell: median of the passes (each the median of the frames of one pass), then every pass")
    print("| precision | run as | with CUDA kernels (ms) | with grid_sample formulation (ms) | ratio | bev_embed rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for way in ("graph", "eager"):
            k, f = r.get(f"{way}_kernels_ms"), r.get(f"{way}_formulation_ms")
            if not k or not f:
                print(f"| {r['precision']} | {way} | {'failed' if not k else statistics.median(k)} | "
                      f"{'failed' if not f else statistics.median(f)} | | |")
                continue
            km, fm = statistics.median(k), statistics.median(f)
            print(f"| {r['precision']} | {way} | {km:.2f} ({', '.join(f'{v:.2f}' for v in k)}) | {fm:.2f} "
                  f"({', '.join(f'{v:.2f}' for v in f)}) | {fm / km:.2f}x | "
                  f"{r.get(f'{way}_bev_embed_rel_diff', float('nan')):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
