"""Calibration cost of the qdq pass on the CPU, against floors measured in the same run.

1. Time. ModelOpt calibration ("max", or with --method entropy ModelOpt's histogram calibration) of the seeded
   transformer with MSDA (tests/passes/qdq_models.py) through the registered ONNX-function kernel, for N1 and N2
   samples. The per-sample cost is the slope
   (T(N2) - T(N1)) / (N2 - N1); the fixed overhead is the intercept T(N1) - N1 * slope (schema/shape work,
   ModelOpt's GEMV probe session, session creation, Q/DQ insertion). The floor is one plain onnxruntime inference
   of the same model (default session options, same kernels): the median of a block of runs taken before, between
   and after the two calibrations of each repeat, so both sides of a ratio see the same load. Each repeat gives
   one ratio slope / floor; the median over the repeats counts, and their spread is printed with it, as are
   the load averages before and after, the ratio taken from the medians of T(N1), T(N2) and the floor over all
   repeats, and the ratio in process CPU time instead of wall time (less sensitive to other load; onnxruntime's
   spinning threads count on both sides). Target: slope <= 1.3 x floor ("max"; entropy is reported against the same
   floor, no target). For histogram calibrations (entropy) the steady per-sample interval is printed too: the time
   between one sample's collection and the next's inside ModelOpt's loop (read off patch 7's per-sample step),
   from the third sample of each calibration on, over the floor, and its two parts: reading and running the
   sample, and collecting its histograms (a slope over few samples of a model this heavy moves by seconds with
   the first samples' allocations; the intervals do not carry those). Also printed: the same inference without
   graph optimizations (calibration must see every intermediate tensor, which rules out onnxruntime's fusions
   across them), and qdqkit's own share (reading one sample from a memory-mapped .npy folder through the
   calibration reader). --compare times, interleaved in the same repeats, ModelOpt without patch 5 ("max") or
   without patches 6 and 7 (entropy), without patch 8, and as it comes (qdqkit/modelopt_compat.py).
2. Memory. In a fresh process that has already imported everything, the peak resident memory (sampled every
   2 ms) while it opens a data set and calibrates on every sample, above the resident memory just before; for a
   small and an 8x larger data set, once from a .npy folder (memory-mapped) and once from an .npz (read whole).
   Target: with the folder, the peak does not grow with the data (bounded); the .npz shows what proportional
   looks like.

3. Histogram (--histogram-only). Patch 6's histogram of one float32 tensor against np.histogram, 128 bins, at
   128K, 512K, 2M and 8M values, over a first histogram's range and a merge's (the counts are checked equal
   first), with its compiled bin assignment (qdqkit/_histogram.c, when pip could build it; scalar, and AVX-512
   where the processor has it) and with its numpy code alone.

   With --bevformer, the same timing on BEVFormer-tiny as the demo's qdq pass receives it (its export, custom ops
   detected and moved to trt.plugins, shapes inferred; the demo's synthetic frames as a .npy folder; every MatMul
   excluded, as by the bevformer-int8 recipe).

Run: python benchmarks/qdq_calibration.py [--quick | --time-only | --histogram-only] [--grid G --width W]
     [--samples N1 N2] [--repeats R] [--compare | --variants NAME...] [--method max|entropy] [--bevformer]
     [--plain-runs K]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "passes"))
import qdq_models


def _registry():
    from qdqkit.plugins import Session

    s = Session.start()
    s.custom_ops.register_onnx_schemas()
    return s.custom_ops


@contextlib.contextmanager
def _sample_ends(intervals: list | None):
    """When each sample's collection starts and ends in a histogram calibration, read off patch 7's per-sample step
    (``modelopt_compat._collect_one_sample``, called once a sample inside ModelOpt's loop when patch 7 is on):
    from one end to the next is a whole sample (reading, the run, the histograms). Nothing without patch 7."""
    from qdqkit import modelopt_compat

    ends: list[tuple[float, float]] = []  # (start, end) of each sample's collection
    if intervals is None:
        yield ends
        return
    original = modelopt_compat._collect_one_sample

    def timed(calibrator, outputs):
        start = time.perf_counter()
        original(calibrator, outputs)
        ends.append((start, time.perf_counter()))

    modelopt_compat._collect_one_sample = timed
    try:
        yield ends
    finally:
        modelopt_compat._collect_one_sample = original


def _calibrate(model, source, registry, n: int, scales: dict | None = None, cpu: list | None = None,
               method: str = "max", exclude: list[str] | None = None, intervals: list | None = None,
               notes: list | None = None) -> float:
    from qdqkit.calib import SampleReader
    from qdqkit.quant_backends import ModelOptBackend, QuantJob

    job = QuantJob(reader=SampleReader(source, 0, n), custom_ops=registry, calibration_method=method,
                   high_precision="fp32", nodes_to_exclude=exclude or [])
    t, c = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), \
            _sample_ends(intervals) as ends:  # onnxruntime's histogram calibration prints every sample
        quantized = ModelOptBackend().quantize(model, job)
    if intervals is not None and len(ends) > 3:
        # from the third sample on: the first two still allocate (arena, page faults), as the intercept shows;
        # each interval split into reading and running the sample, and collecting its histograms
        intervals.extend((b[1] - a[1], b[0] - a[1], b[1] - b[0]) for a, b in zip(ends[2:], ends[3:]))
    seconds = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    if notes is not None:  # the report lines of qdqkit's ModelOpt patches (what patches 8, 9 and 11 did)
        notes.extend(job.notes)
    if scales is not None:
        from onnx import numpy_helper

        scales.update({i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer if "scale" in i.name})
    return seconds


def _scale_difference(a: dict, b: dict) -> float:
    """Largest relative difference between two quantized models' scales (inf if they name different ones)."""
    if a.keys() != b.keys():
        return float("inf")
    return max((float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-30))) for k in a), default=0.0)


# What each compared configuration passes to modelopt_compat.patched_modelopt (the backend calls it bare).
VARIANTS = {
    "shipped": {},
    "without-running-ranges": {"running_ranges": False},
    "without-direct-histograms": {"direct_histograms": False},
    "without-read-ranges-only": {"read_ranges_only": False},
    "without-shape-probes": {"shape_probes": False},
    "without-blocked-fetch": {"blocked_fetch": False},
}
# every switch of patched_modelopt off (derived, so that a patch added later is off here too)
VARIANTS["modelopt-as-it-comes"] = {
    name: False for name in inspect.signature(
        importlib.import_module("qdqkit.modelopt_compat").patched_modelopt).parameters}
# the variant that leaves out the patch specific to each calibration method
_WITHOUT = {"max": "without-running-ranges", "entropy": "without-direct-histograms"}


@contextlib.contextmanager
def _variant(name: str):
    from qdqkit import modelopt_compat

    original = modelopt_compat.patched_modelopt
    modelopt_compat.patched_modelopt = functools.partial(original, **VARIANTS[name])
    try:
        yield
    finally:
        modelopt_compat.patched_modelopt = original


def _plain_ms(sess, source, n: int, runs: int, cpu: list | None = None) -> float:
    """Median wall time of one inference over a block of runs; the block's mean process CPU time to ``cpu``."""
    times = []
    c = time.process_time()
    for i in range(runs):
        x = source.sample(i % n)
        t = time.perf_counter()
        sess.run(None, x)
        times.append(time.perf_counter() - t)
    if cpu is not None:
        cpu.append((time.process_time() - c) / runs * 1e3)
    return statistics.median(times) * 1e3


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": [round(v, 3) for v in values]}


def _bevformer(n2: int) -> tuple:
    """BEVFormer-tiny as the qdq pass receives it in the demo (exported, custom ops detected and moved to
    trt.plugins, shapes inferred), its registry, a folder source of n2 + 1 synthetic frames (the demo's
    generator; both cached), and the nodes the demo's bevformer-int8 recipe excludes (every MatMul)."""
    from qdqkit.calib import builtin_source, model_inputs
    from qdqkit.examples.bevformer.calib import generate, parse_spec
    from qdqkit.examples.bevformer.export import export
    from qdqkit.model import ModelHandle
    from qdqkit.pass_infra import PassContext
    from qdqkit.pipeline import Pipeline, steps_from_names
    from qdqkit.plugins import Session
    from qdqkit.rules import ExclusionRules

    session = Session.start()
    session.custom_ops.register_onnx_schemas()
    handle = ModelHandle.load(export(log=lambda *a: None).onnx_path)
    steps = steps_from_names("detect-custom-ops,trt-plugin-domain,infer-shapes")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=Path(tmp))
        list(Pipeline(steps, session.passes, hook=session.hook).run(handle, ctx))
    model = handle.proto
    folder = generate(parse_spec(f"bevformer:frames={n2 + 1}"), log=lambda *a: None)
    exclude = ExclusionRules.from_options(op_types=["MatMul"]).resolve(model).excluded
    return model, session.custom_ops, builtin_source(str(folder), model_inputs(model)), exclude


def time_benchmark(grid: int, width: int, n1: int, n2: int, repeats: int = 7,
                   variants: tuple[str, ...] = ("shipped",), method: str = "max", bevformer: bool = False,
                   plain_runs: int | None = None) -> dict:
    from qdqkit.calib import ArraySource, model_inputs

    load_before = os.getloadavg()
    exclude = None
    if bevformer:
        model, registry, source, exclude = _bevformer(n2)
    else:
        registry = _registry()
        model = qdq_models.transformer_msda(grid=grid, width=width)
        images = qdq_models.calibration_images(n2, size=2 * grid)
        source = ArraySource({"image": images}, model_inputs(model), "memory")
    sess = registry.session(model)
    _plain_ms(sess, source, n2, 2 if bevformer else 5)
    # Calibration observes every intermediate tensor, which rules out onnxruntime's fused plan; the same model
    # run without graph optimizations is the floor for that kind of execution.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused_sess = registry.session(model, sess_options=so)
    _plain_ms(unfused_sess, source, n2, 2 if bevformer else 5)
    runs = plain_runs or max(30, n2 // 4)
    scales: dict[str, dict] = {name: {} for name in variants}
    notes: dict[str, list] = {}
    for name in variants:  # warm (imports, first-call work); the scales of each configuration, to compare
        with _variant(name):
            _calibrate(model, source, registry, n1, scales[name], method=method, exclude=exclude,
                       notes=notes.setdefault(name, []))
    # Interleaved: a block of plain inferences before and after every calibration, so that a change in the
    # machine's other load hits both sides of a ratio alike; the order of N1 and N2 alternates between repeats.
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    intervals: dict[str, list[tuple]] = {name: [] for name in variants}  # (whole, read and run, histograms)
    plain_all, unfused_all = [], []
    for r in range(repeats):
        for name in variants:
            order = (n1, n2) if r % 2 == 0 else (n2, n1)
            plain_cpu: list[float] = []
            plain, seconds, cpu = [_plain_ms(sess, source, n2, runs, plain_cpu)], {}, {}
            with _variant(name):
                for n in order:
                    c: list[float] = []
                    seconds[n] = _calibrate(model, source, registry, n, cpu=c, method=method, exclude=exclude,
                                            intervals=intervals[name])
                    cpu[n] = c[0]
                    plain.append(_plain_ms(sess, source, n2, runs, plain_cpu))
            plain_ms = statistics.median(plain)
            plain_all.extend(plain)
            slope_ms = (seconds[n2] - seconds[n1]) / (n2 - n1) * 1e3
            cpu_slope_ms = (cpu[n2] - cpu[n1]) / (n2 - n1) * 1e3
            rows[name].append({"plain_ms": plain_ms, "per_sample_ms": slope_ms, "ratio": slope_ms / plain_ms,
                               "cpu_ratio": cpu_slope_ms / statistics.median(plain_cpu), "seconds": seconds,
                               "fixed_overhead_s": seconds[n1] - n1 * slope_ms / 1e3,
                               "whole_N2_over_N2_plain": seconds[n2] * 1e3 / (n2 * plain_ms)})
        unfused_all.append(_plain_ms(unfused_sess, source, n2, runs))
    with tempfile.TemporaryDirectory() as tmp:
        from qdqkit.calib import SampleReader, builtin_source

        if not bevformer:
            np.save(Path(tmp) / "image.npy", images)
        folder = source if bevformer else builtin_source(tmp, model_inputs(model))
        t = time.perf_counter()
        for _ in SampleReader(folder, 0, n2):
            pass
        reader_ms = (time.perf_counter() - t) / n2 * 1e3
    plain_ms = statistics.median(plain_all)
    out: dict = {
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "model": "BEVFormer-tiny (the demo's export and synthetic frames, every MatMul excluded)" if bevformer else
                 f"transformer_msda(grid={grid}, width={width}), input [1,3,{2 * grid},{2 * grid}]",
        "calibration_method": method, "samples": [n1, n2], "repeats": repeats,
        "plain_inference_ms": plain_ms,
        "plain_unfused_inference_ms": statistics.median(unfused_all),
        "qdqkit_reader_ms_per_sample": reader_ms,
        "qdqkit_reader_over_plain": reader_ms / plain_ms,
    }
    for name in variants:
        rs = rows[name]
        out[name] = {
            "per_sample_over_plain": _spread([x["ratio"] for x in rs]),
            # the same from the medians of T(N1), T(N2) and the plain runs over all repeats (one outlier moves it less)
            "per_sample_over_plain_of_medians":
                (statistics.median(x["seconds"][n2] for x in rs) - statistics.median(x["seconds"][n1] for x in rs))
                / (n2 - n1) * 1e3 / plain_ms,
            # process CPU time instead of wall time: less sensitive to the machine's other load
            "per_sample_over_plain_cpu_time": _spread([x["cpu_ratio"] for x in rs]),
            "patch_notes": notes[name],  # from the warm-up calibration (N1 samples)
            "per_sample_ms": statistics.median(x["per_sample_ms"] for x in rs),
            "per_sample_over_plain_unfused":
                statistics.median(x["per_sample_ms"] for x in rs) / statistics.median(unfused_all),
            "fixed_overhead_s": _spread([x["fixed_overhead_s"] for x in rs]),
            f"T(N{n2})_over_N_x_plain": statistics.median(x["whole_N2_over_N2_plain"] for x in rs),
        }
        if intervals[name]:  # histogram calibration with patch 7: the steady per-sample interval, sample 3 on
            for i, part in enumerate(("sample_interval", "sample_read_and_run", "sample_histograms")):
                out[name][f"{part}_over_plain"] = _spread([v[i] * 1e3 / plain_ms for v in intervals[name]])
            out[name]["sample_intervals"] = len(intervals[name])
    for name in variants[1:]:
        out[name][f"scales_max_relative_difference_to_{variants[0]}"] = _scale_difference(scales[name],
                                                                                         scales[variants[0]])
    ratios = out[variants[0]]["per_sample_over_plain"]
    if method == "max":
        out["target"] = f"{variants[0]}: per_sample_over_plain <= 1.3 (slope; the intercept is the fixed overhead)"
        out["met_by_median"] = 0 < ratios["median"] <= 1.3
        out["met_in_every_repeat"] = 0 < ratios["max"] <= 1.3
    return out


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


def histogram_benchmark(repeats: int = 21) -> dict:
    """Patch 6's histogram of one float32 tensor (``_uniform_histogram``, 128 bins over the tensor's symmetric range,
    no threads) against ``np.histogram`` of the same data, per size and per range: as ModelOpt's first histogram
    takes it (Python floats: numpy's quotient in float64) and as onnxruntime's merge does (float32 thresholds: the
    quotient in float32). The median of ``repeats`` interleaved calls each: with its numpy code alone, and with
    its compiled bin assignment (qdqkit/_histogram.c, when built) at each level this processor runs (scalar, and
    AVX-512 where it has it). The extremes (numpy's in all) are inside the timings; the flattening copies patch 6
    also saves are not counted. 8M values (32 MB) no longer fit in this machine's caches."""
    from qdqkit import modelopt_compat

    native = modelopt_compat._NATIVE
    levels = native.simd_levels() if native is not None else ()
    level_before = native.simd() if native is not None else None
    rng = np.random.default_rng(0)
    out: dict = {"bins": 128, "repeats": repeats, "compiled_built": native is not None, "compiled_levels": levels}
    for size in (1 << 17, 1 << 19, 1 << 21, 1 << 23):
        x = (rng.standard_normal(size) * 2.5).astype(np.float32)
        t32 = np.max(np.abs(x))
        for range_name, range_ in (("first", (-float(t32), float(t32))), ("merge", (-t32, t32))):
            want = np.histogram(x, 128, range=range_)[0]

            def ours(level: str | None, range_: tuple = range_) -> Any:
                modelopt_compat._NATIVE = native if level else None
                if level:
                    native.simd(level)
                try:
                    return modelopt_compat._uniform_histogram([x], 128, range_, [(x.min(), x.max())])[0]
                finally:
                    modelopt_compat._NATIVE = native

            calls = {"np_histogram": lambda range_=range_: np.histogram(x, 128, range=range_),
                     "patch6_numpy": lambda: ours(None)}
            calls.update({f"patch6_{level}": functools.partial(ours, level) for level in levels})
            for name, call in calls.items():
                if name != "np_histogram" and not np.array_equal(call(), want):
                    raise AssertionError(f"patch 6's histogram ({name}) differs from numpy's at {size} values")
            timings: dict = {name: [] for name in calls}
            for _ in range(repeats if size < (1 << 23) else max(3, repeats // 3)):
                for name, call in calls.items():
                    c = time.perf_counter()
                    call()
                    timings[name].append(time.perf_counter() - c)
            row = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in timings.items()}
            for name in calls:
                if name != "np_histogram":
                    row[f"speedup_{name[7:]}"] = row["np_histogram_ms"] / row[f"{name}_ms"]
                    row[f"{name[7:]}_ns_per_value"] = row[f"{name}_ms"] * 1e6 / size
            out[f"{size}_values_{range_name}"] = row
    if native is not None:
        native.simd(level_before)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--grid", type=int, default=16, help="test-model token grid (input is 2*grid square)")
    ap.add_argument("--width", type=int, default=64, help="test-model embedding width")
    ap.add_argument("--samples", type=int, nargs=2, default=(8, 264), metavar=("N1", "N2"),
                    help="the two calibration sizes whose difference gives the per-sample cost (default 8 264)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the median counts (default 7)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--compare", action="store_true",
                    help="also time ModelOpt without the method's own patch (5 for max, 6 and 7 for entropy), "
                         "without patch 8, and as it comes, interleaved in the same repeats")
    which.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), metavar="NAME",
                    help=f"time these configurations, interleaved in the same repeats (the first is the one the "
                         f"others' scales are compared with): {', '.join(VARIANTS)}")
    ap.add_argument("--method", choices=("max", "entropy"), default="max",
                    help="calibration method timed (default max; the memory part always uses max)")
    ap.add_argument("--bevformer", action="store_true",
                    help="time BEVFormer-tiny (the demo's model and synthetic frames) instead of the test model; "
                         "with --time-only, e.g. --method entropy --samples 2 8 --repeats 1 --plain-runs 5")
    ap.add_argument("--plain-runs", type=int, help="plain inferences per block (default max(30, N2/4))")
    ap.add_argument("--histogram-only", action="store_true",
                    help="only patch 6's histogram of one tensor against np.histogram (128K to 8M values)")
    args = ap.parse_args()
    if (args.bevformer or args.plain_runs is not None) and not args.time_only:
        ap.error("--bevformer and --plain-runs time only with --time-only (the memory part uses the test model)")
    if args.histogram_only:
        print(json.dumps({"histogram": histogram_benchmark()}, indent=2))
        return
    if args.child:
        kind, path, grid, width = args.child
        _child(kind, path, int(grid), int(width))
        return
    variants = tuple(args.variants) if args.variants else \
        ("shipped", _WITHOUT[args.method], "without-read-ranges-only", "modelopt-as-it-comes") if args.compare else \
        ("shipped",)
    n1, n2 = args.samples
    if args.time_only:
        figures = {"time": time_benchmark(args.grid, args.width, n1, n2, args.repeats, variants, args.method,
                                          args.bevformer, args.plain_runs)}
    elif args.quick:
        figures = {"time": time_benchmark(8, 32, n1, n2, 3, variants, args.method),
                   "memory": memory_benchmark(16, 32, 64, 512)}
    else:
        figures = {"time": time_benchmark(args.grid, args.width, n1, n2, args.repeats, variants, args.method),
                   "memory": memory_benchmark(32, 32, 128, 1024)}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
