"""The fp16 pass's range measurement (``qdqkit.precision.tensor_ranges``) against plain inference of the same model.

On BEVFormer-tiny as the demo exports it (custom ops in trt.plugins, shapes inferred) with the demo's synthetic
frames, each configuration in a fresh process (its peak resident memory is the process's):

  plain      one onnxruntime session of the model, default options, N frames
  shipped    tensor_ranges over every float tensor of the model, N frames
  producer   the same reductions listed right after each tensor's producer instead of in reverse (the order
             ``ranges_model`` avoids; the benchmark builds it by reordering the shipped model's nodes)

Per-frame cost is the slope between 1 and N frames, so session creation and the first run's allocations are the
intercept. Ratios are against plain in the same invocation.

    python benchmarks/fp16_ranges.py [--frames 6] [--configs plain shipped producer]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _model_and_source(frames: int):
    from qdq_calibration import _bevformer

    model, registry, source, _ = _bevformer(frames)
    return model, registry, source


def _producer_order(ranged):
    """The ranges model with each tensor's reductions moved right after the node that makes the tensor."""
    g = ranged.graph
    added = [n for n in g.node if n.name.startswith("qdqkit_ranges/") and n.name != "qdqkit_ranges/concat"]
    concat = [n for n in g.node if n.name == "qdqkit_ranges/concat"]
    model_nodes = [n for n in g.node if not n.name.startswith("qdqkit_ranges/")]
    by_tensor: dict[str, list] = {}
    source_of = {}
    for n in added:
        i = n.name.split("/")[1]
        by_tensor.setdefault(i, []).append(n)
        if n.op_type in ("Cast", "ReduceMin") and i not in source_of:
            source_of[i] = n.input[0]
    chains = {source_of[i]: nodes for i, nodes in by_tensor.items()}
    order = [n for t in (i.name for i in g.input) for n in chains.get(t, [])]
    for n in model_nodes:
        order.append(n)
        for t in n.output:
            order.extend(chains.get(t, []))
    del g.node[:]
    g.node.extend(order + concat)
    return ranged


def _child(config: str, frames: int) -> None:
    """Run one configuration over 1 and then ``frames`` frames; print JSON with the times and the peak."""
    import onnx

    from qdqkit import precision

    model, registry, source = _model_and_source(frames)
    out: dict = {"config": config}
    if config == "plain":
        session = registry.session(model)
        times = []
        for i in range(frames):
            t = time.perf_counter()
            session.run(None, source.sample(i))
            times.append(time.perf_counter() - t)
        out["per_frame_s"] = statistics.median(times[1:])
    else:
        if config == "producer":
            original = precision.ranges_model
            precision.ranges_model = lambda m, t: _producer_order(original(m, t))
        tensors = precision.float_tensors(onnx.shape_inference.infer_shapes(model))
        out["tensors"] = len(tensors)
        spans = {}
        for n in (1, frames):
            t = time.perf_counter()
            precision.tensor_ranges(model, registry, source, 0, n, tensors)
            spans[n] = time.perf_counter() - t
        out["per_frame_s"] = (spans[frames] - spans[1]) / (frames - 1)
        out["fixed_s"] = spans[1] - out["per_frame_s"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--configs", nargs="+", default=["plain", "shipped", "producer"],
                    choices=("plain", "shipped", "producer"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.frames)
        return 0
    results = {}
    load = os.getloadavg()
    for config in args.configs:
        run = subprocess.run([sys.executable, __file__, "--child", config, "--frames", str(args.frames)],
                             capture_output=True, text=True, check=True)
        results[config] = json.loads(run.stdout.strip().splitlines()[-1])
    plain = results.get("plain", {}).get("per_frame_s")
    for r in results.values():
        if plain and r["config"] != "plain":
            r["per_frame_over_plain"] = round(r["per_frame_s"] / plain, 3)
        if "plain" in results:
            r["peak_over_plain"] = round(r["peak_rss_gb"] / results["plain"]["peak_rss_gb"], 2)
    print(json.dumps({"frames": args.frames, "load_average_before": load, "load_average_after": os.getloadavg(),
                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
