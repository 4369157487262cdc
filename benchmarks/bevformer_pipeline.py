"""BEVFormer example: where the time of the end-to-end demo goes, measured against stated floors.

Measures, in one run on this machine:
  1. export: a fresh (uncached) ONNX export, and the cached second call;
  2. one frame of FP32 inference: onnxruntime CPU with the custom ops' ONNX-function kernels, against the PyTorch
     forward of the same model (the peer, same inputs, same process);
  3. synthetic data: seconds per frame of image/ego-motion generation, and of the prev_bev roll-out;
  4. optionally (``--demo``) the whole ``python -m qdqkit.examples.bevformer demo`` wall time (its default:
     one recipe, bevformer-int8), the quick start's first command without its installs.

Usage: python benchmarks/bevformer_pipeline.py [--frames 3] [--demo]
Prints one line per figure: value, floor or peer, ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np


def _t(fn, repeat=1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--demo", action="store_true", help="also time the full demo (several minutes)")
    args = ap.parse_args()

    import onnx
    import torch

    from qdqkit.examples.bevformer import data as D
    from qdqkit.examples.bevformer import export as E
    from qdqkit.plugins import Session

    with tempfile.TemporaryDirectory() as tmp:
        t_export, res = _t(lambda: E.export(out_dir=tmp, log=lambda _m: None))
        t_cached, again = _t(lambda: E.export(out_dir=tmp, log=lambda _m: None))
        assert again.cached
        print(f"export (fresh)          {t_export:8.1f} s   floor 120 s      ratio {t_export / 120:.2f}")
        print(f"export (cached)         {t_cached:8.2f} s   fresh {t_export:.1f} s  ratio {t_cached / t_export:.3f}")

        gen = D.SceneGenerator(seed=0, scene_len=4)
        sample = gen.inputs(1)
        sample["prev_bev"] = np.random.default_rng(0).standard_normal((2500, 1, 256)).astype(np.float32)
        sess = Session.start().custom_ops.session(onnx.load(str(res.onnx_path)))
        sess.run(None, sample)  # warm-up
        t_ort, _ = _t(lambda: sess.run(None, sample), repeat=2)
        model = res.load_model()
        feeds = [torch.from_numpy(sample[k]) for k in D.INPUT_NAMES]
        with torch.no_grad():
            model(*feeds)
            t_torch, _ = _t(lambda: model(*feeds), repeat=2)
        print(f"FP32 frame, onnxruntime {t_ort:8.2f} s   PyTorch {t_torch:.2f} s  ratio {t_ort / t_torch:.2f}")

        t_gen, _ = _t(lambda: [gen.inputs(i) for i in range(args.frames)])
        per = t_gen / args.frames
        print(f"frame synthesis         {per:8.2f} s   FP32 frame {t_ort:.2f} s ratio {per / t_ort:.2f}")
        t_roll, _ = _t(lambda: D.generate_sequence(args.frames, D.onnx_bev_fn(res.onnx_path), seed=0, scene_len=4))
        per = t_roll / args.frames
        print(f"roll-out per frame      {per:8.2f} s   floor 10 s       ratio {per / 10:.2f}")

    if args.demo:
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            rc = subprocess.call([sys.executable, "-m", "qdqkit.examples.bevformer", "demo", "--workdir", work,
                                  "--recipe", "bevformer-int8", "--calib-samples", "8", "--val-samples", "4"])
            t_demo = time.perf_counter() - t0
        # no floor for the whole demo: its parts are timed against theirs above; this is the total a user waits
        print(f"demo (8+4 frames, bevformer-int8) {t_demo:8.0f} s   (exit {rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
