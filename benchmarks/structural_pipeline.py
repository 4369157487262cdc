"""Structural pipeline cost against the floor of ``onnx.load`` + ``onnx.save`` of the same file, same run.

Three generated models (seeded, built by tests/core/toymodels.py with the toy custom ops of tests/core):
  * wide: >= 10,000 small nodes, one custom op in five, two shared constants (per-node costs only: a stress case);
  * wide_dense: the same graph with a [128, 128] MatMul weight per block (~128 MB, a realistic weight density);
  * big:  > 2 GB of weights, written with external data.
For each, in fresh processes so peak memory is the step's own:
  * floor:    onnx.load (with external data) + onnx.save (external data again for the big one);
  * peer:     the floor plus onnx's own shape inference (data propagation on) with the custom-op schemas: what any
              tool must pay to type every tensor;
  * pipeline: ModelHandle.load -> detect-custom-ops, trt-plugin-domain, infer-shapes, check -> atomic save;
  * +simplify (wide only): the same with onnxsim, reported separately (onnxsim skips models over 2 GB).
Printed: wall time and peak RSS of each, time ratio pipeline / floor (target <= 3x), and peak memory net of the
interpreter's baseline as a multiple of the model size (target <= 1.5x); the floor's multiple is shown beside it.

Run:  python benchmarks/structural_pipeline.py [--nodes 10000] [--big-gb 2.2] [--repeat 3] [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_TESTS = ROOT / "tests" / "core"
PASSES = "detect-custom-ops,trt-plugin-domain,infer-shapes,check"

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, {core!r})
from qdqkit.report import peak_rss, reset_peak_rss
def reset():
    if not reset_peak_rss():
        raise SystemExit("needs /proc/self/clear_refs: each step's own peak memory cannot be measured")
mode, src, dst, external = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
import onnx
if mode in ("floor", "peer"):
    if mode == "peer":
        from qdqkit.plugins import Session
        session = Session.start(["qdqkit_toyops"], autoload=False)
        session.custom_ops.register_onnx_schemas()
    reset(); base = peak_rss(); t = time.perf_counter()
    m = onnx.load(src)
    if mode == "peer":
        if external:
            onnx.shape_inference.infer_shapes_path(src, dst + ".inferred.onnx", data_prop=True)
        else:
            m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    if external:
        onnx.save(m, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(dst) + ".data")
    else:
        onnx.save(m, dst)
else:
    from qdqkit.model import ModelHandle
    from qdqkit.pass_infra import PassContext
    from qdqkit.pipeline import Pipeline, steps_from_names
    from qdqkit.plugins import Session
    from pathlib import Path
    session = Session.start(["builtin-passes", "qdqkit_toyops"], autoload=False)
    session.custom_ops.register_onnx_schemas()
    import onnxsim, onnxruntime  # imported before the clock: the floor does not pay for imports either
    reset(); base = peak_rss(); t = time.perf_counter()
    handle = ModelHandle.load(src)
    pipe = Pipeline(steps_from_names(mode), session.passes, hook=session.hook)
    ctx = PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=Path(os.path.dirname(dst)))
    records = pipe.run(handle, ctx)
    handle.save(dst)
    assert handle.conversions == 0
wall = time.perf_counter() - t
print(json.dumps({{"wall": wall, "peak": peak_rss(), "base": base}}))
"""


def _measure(mode: str, src: Path, dst: Path, external: bool) -> dict:
    code = WORKER.format(core=str(CORE_TESTS))
    env = dict(os.environ, QDQKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-c", code, mode, str(src), str(dst), "1" if external else "0"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    for p in dst.parent.glob(dst.name + "*"):
        p.unlink()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(mode: str, src: Path, dst: Path, external: bool, repeat: int) -> dict:
    runs = [_measure(mode, src, dst, external) for _ in range(repeat)]
    return {"wall": min(r["wall"] for r in runs), "peak": min(r["peak"] for r in runs),
            "base": min(r["base"] for r in runs)}


def _row(label: str, r: dict, size: int) -> str:
    net = (r["peak"] - r["base"]) / size
    return (f"  {label:<22} {r['wall']:8.3f} s   peak RSS {r['peak'] / 2**20:9.1f} MiB   "
            f"net of baseline {net:5.2f}x model size")


def bench(name: str, model, folder: Path, external: bool, repeat: int, with_simplify: bool) -> dict:
    from qdqkit.model import save_model

    src = folder / f"{name}.onnx"
    t = time.perf_counter()
    save_model(model, src, external_data=external)
    del model
    size = sum(p.stat().st_size for p in folder.glob(f"{name}.onnx*"))
    print(f"{name}: {size / 2**20:.1f} MiB on disk (written in {time.perf_counter() - t:.1f} s)", flush=True)
    dst = folder / "out" / f"{name}.onnx"
    dst.parent.mkdir(exist_ok=True)
    floor = _best("floor", src, dst, external, repeat)
    peer = _best("peer", src, dst, external, repeat)
    pipe = _best(PASSES, src, dst, external, repeat)
    print(_row("floor (load + save)", floor, size))
    print(_row("peer: + onnx infer_shapes", peer, size))
    print(_row("structural pipeline", pipe, size))
    result = {"size": size, "floor": floor, "peer": peer, "pipeline": pipe,
              "time_ratio": pipe["wall"] / floor["wall"], "peer_time_ratio": peer["wall"] / floor["wall"],
              "mem_ratio": (pipe["peak"] - pipe["base"]) / size,
              "floor_mem_ratio": (floor["peak"] - floor["base"]) / size}
    print(f"  time ratio {result['time_ratio']:.2f}x floor (target <= 3x; onnx shape inference alone "
          f"{result['peer_time_ratio']:.2f}x); peak memory "
          f"{result['mem_ratio']:.2f}x model size (target <= 1.5x; floor {result['floor_mem_ratio']:.2f}x)")
    if with_simplify:
        simp = _best(PASSES.replace("infer-shapes", "simplify,infer-shapes"), src, dst, external, repeat)
        print(_row("  + simplify (onnxsim)", simp, size))
        result["with_simplify"] = simp
        result["simplify_time_ratio"] = simp["wall"] / floor["wall"]
        print(f"  with simplify: time ratio {result['simplify_time_ratio']:.2f}x floor (no target: onnxsim's own cost)")
    for p in folder.glob(f"{name}.onnx*"):
        p.unlink()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--big-gb", type=float, default=2.2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    sys.path.insert(0, str(CORE_TESTS))
    import toymodels

    results = {}
    with tempfile.TemporaryDirectory(prefix="qdqkit-bench-") as tmp:
        folder = Path(tmp)
        results["wide"] = bench("wide", toymodels.wide_model(args.nodes), folder, False, args.repeat, True)
        results["wide_dense"] = bench("wide_dense", toymodels.wide_model(args.nodes, width=128, dense=True), folder,
                                      False, args.repeat, True)
        if not args.skip_big:
            # no name kept here: bench drops the only reference once the file is written
            results["big"] = bench("big", toymodels.big_model(int(args.big_gb * 2**30)), folder, True,
                                   max(1, args.repeat - 1), False)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
