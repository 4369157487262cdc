"""Calibration cost of the qdq pass on the CPU, against floors measured in the same run.

1. Time. ModelOpt calibration (max) of the seeded transformer with MSDA (tests/passes/qdq_models.py) through the
   registered ONNX-function kernel, for N1 and N2 samples. The per-sample cost is the slope
   (T(N2) - T(N1)) / (N2 - N1); the fixed overhead is T(N1) - N1 * slope (schema/shape work, ModelOpt's GEMV
   probe session, Q/DQ insertion). The floor is one plain onnxruntime inference of the same model (default
   session options, same kernels), median of repeated runs. Target: slope <= 1.3 x floor. Also printed: the
   same inference without graph optimizations (calibration must see every intermediate tensor, which rules
   out onnxruntime's fusions, so that is the floor for what calibration has to execute). qdqkit's own share
   of the slope (reading one sample from a memory-mapped .npy folder through the calibration reader) is
   measured separately. Each calibration runs 3 times and the median counts; the load average is printed,
   because the figures are only as quiet as the machine.
2. Memory. In a fresh process that has already imported everything, the peak resident memory (sampled every
   2 ms) while it opens a data set and calibrates on every sample, above the resident memory just before; for a
   small and an 8x larger data set, once from a .npy folder (memory-mapped) and once from an .npz (read whole).
   Target: with the folder, the peak does not grow with the data (bounded); the .npz shows what proportional
   looks like.

Run: python benchmarks/qdq_calibration.py [--quick | --time-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "passes"))
import qdq_models  # noqa: E402


def _registry():
    from qdqkit.plugins import Session

    s = Session.start()
    s.custom_ops.register_onnx_schemas()
    return s.custom_ops


def _calibrate(model, source, registry, n: int) -> float:
    from qdqkit.calib import SampleReader
    from qdqkit.quant_backends import ModelOptBackend, QuantJob

    job = QuantJob(reader=SampleReader(source, 0, n), custom_ops=registry, calibration_method="max",
                   high_precision="fp32", nodes_to_exclude=[])
    t = time.perf_counter()
    ModelOptBackend().quantize(model, job)
    return time.perf_counter() - t


def time_benchmark(grid: int, width: int, n1: int, n2: int) -> dict:
    from qdqkit.calib import ArraySource, model_inputs

    registry = _registry()
    model = qdq_models.transformer_msda(grid=grid, width=width)
    images = qdq_models.calibration_images(n2, size=2 * grid)
    source = ArraySource({"image": images}, model_inputs(model), "memory")
    sess = registry.session(model)
    for i in range(3):
        sess.run(None, source.sample(i))
    runs = []
    for i in range(max(30, n2 // 2)):
        x = source.sample(i % n2)
        t = time.perf_counter()
        sess.run(None, x)
        runs.append(time.perf_counter() - t)
    plain = statistics.median(runs)
    # Calibration observes every intermediate tensor, which rules out onnxruntime's fused plan; the same model
    # run without graph optimizations is the floor for that kind of execution.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused_sess = registry.session(model, sess_options=so)
    unfused_sess.run(None, source.sample(0))
    unfused = []
    for i in range(max(30, n2 // 2)):
        x = source.sample(i % n2)
        t = time.perf_counter()
        unfused_sess.run(None, x)
        unfused.append(time.perf_counter() - t)
    plain_unfused = statistics.median(unfused)
    _calibrate(model, source, registry, 2)  # warm: imports, first-call work
    t1 = statistics.median(_calibrate(model, source, registry, n1) for _ in range(3))
    t2 = statistics.median(_calibrate(model, source, registry, n2) for _ in range(3))
    slope = (t2 - t1) / (n2 - n1)
    with tempfile.TemporaryDirectory() as tmp:
        from qdqkit.calib import SampleReader, builtin_source

        np.save(Path(tmp) / "image.npy", images)
        folder = builtin_source(tmp, model_inputs(model))
        t = time.perf_counter()
        for _ in SampleReader(folder, 0, n2):
            pass
        reader = (time.perf_counter() - t) / n2
    return {
        "load_average_1min": os.getloadavg()[0],
        "model": f"transformer_msda(grid={grid}, width={width}), input [1,3,{2 * grid},{2 * grid}]",
        "plain_inference_ms": plain * 1e3,
        f"calibration_s_N{n1}": t1, f"calibration_s_N{n2}": t2,
        "per_sample_ms": slope * 1e3,
        "per_sample_over_plain": slope / plain,
        "plain_unfused_inference_ms": plain_unfused * 1e3,
        "per_sample_over_plain_unfused": slope / plain_unfused,
        "qdqkit_reader_ms_per_sample": reader * 1e3,
        "qdqkit_reader_over_plain": reader / plain,
        "fixed_overhead_s": t1 - n1 * slope,
        f"T(N{n2})_over_N_x_plain": t2 / (n2 * plain),
        "target": "per_sample_over_plain <= 1.3",
        "met": 0 < slope / plain <= 1.3,
    }


def _child(kind: str, path: str, grid: int, width: int) -> None:
    import threading

    import modelopt.onnx.quantization  # noqa: F401  (imported before the baseline is taken)

    from qdqkit.calib import builtin_source, model_inputs

    registry = _registry()
    model = qdq_models.transformer_msda(grid=grid, width=width)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    source = builtin_source(path, model_inputs(model))
    seconds = _calibrate(model, source, registry, len(source))
    stop.set()
    th.join()
    print(json.dumps({"kind": kind, "samples": len(source), "peak_above_base_mb": (peak[0] - base) / 2**20,
                      "seconds": seconds}))


def memory_benchmark(grid: int, width: int, small: int, large: int) -> dict:
    out: dict = {"model": f"transformer_msda(grid={grid}, width={width})"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in (small, large):
            images = qdq_models.calibration_images(n, size=2 * grid)
            (tmp / f"folder{n}").mkdir()
            np.save(tmp / f"folder{n}" / "image.npy", images)
            np.savez(tmp / f"data{n}.npz", image=images)
            out[f"data_mb_{n}"] = images.nbytes / 2**20
            del images
        for kind in ("folder", "npz"):
            for n in (small, large):
                path = tmp / (f"folder{n}" if kind == "folder" else f"data{n}.npz")
                res = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(grid), str(width)],
                                     capture_output=True, text=True, check=True)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]
                out[f"{kind}_peak_above_base_mb_{n}"] = json.loads(line)["peak_above_base_mb"]
    grow = out[f"data_mb_{large}"] - out[f"data_mb_{small}"]
    out["data_growth_mb"] = grow
    out["folder_peak_growth_mb"] = out[f"folder_peak_above_base_mb_{large}"] - out[f"folder_peak_above_base_mb_{small}"]
    out["npz_peak_growth_mb"] = out[f"npz_peak_above_base_mb_{large}"] - out[f"npz_peak_above_base_mb_{small}"]
    out["target"] = "folder_peak_growth_mb well under data_growth_mb (bounded)"
    out["met"] = out["folder_peak_growth_mb"] < 0.1 * grow
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--grid", type=int, default=16, help="test-model token grid (input is 2*grid square)")
    ap.add_argument("--width", type=int, default=64, help="test-model embedding width")
    args = ap.parse_args()
    if args.child:
        kind, path, grid, width = args.child
        _child(kind, path, int(grid), int(width))
        return
    if args.time_only:
        figures = {"time": time_benchmark(args.grid, args.width, 8, 136)}
    elif args.quick:
        figures = {"time": time_benchmark(8, 32, 8, 136), "memory": memory_benchmark(16, 32, 64, 512)}
    else:
        figures = {"time": time_benchmark(16, 64, 8, 136), "memory": memory_benchmark(32, 32, 128, 1024)}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
