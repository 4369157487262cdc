"""CPU cost of BEVFormer's plugin ops in onnxruntime, and their share of one BEVFormer-tiny frame.

Part 1 times the candidate CPU implementations of each op at the BEVFormer-tiny shapes (bevformer-tiny.md §4.2),
each a one-node model run by onnxruntime:
  - ``function-table``: the shipped ONNX function (a table of 2x2 neighbourhoods, one Gather, one MatMul), at
    opset 13 and 19;
  - ``function-gather``: four Gathers of value rows (one per bilinear corner) and four MatMuls;
  - ``function-gridsample``: the same maths with GridSample (opset >= 16 only);
  - ``python-op``: an onnxruntime-extensions Python op calling the plain-PyTorch forward (every output element
    goes through Python; this is the other way to run a custom op without a compiled library).
Part 2 exports (or reuses the cached export of) BEVFormer-tiny with seeded weights, runs whole frames in
onnxruntime on the CPU with the shipped functions, and reports the custom ops' share of a frame two ways: from an
onnxruntime profile of the full frame (kernel time of the nodes inlined from the functions / all kernel time), and
as (sum of the standalone times of the 12 MSDA calls + Rotate) / (median frame time). Floor: at most 15 %.

    python benchmarks/cpu_ops_bench.py [--repeat 5] [--threads 2] [--skip-frame] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from qdqkit.customops import CustomOpRegistry
from qdqkit.custom_ops import functions, plugin

SHARE_FLOOR = 0.15

# name -> (B, spatial_shapes, Q, M, D, G, P, calls per frame)
MSDA_SHAPES = {
    "tsa": (2, [[50, 50]], 2500, 8, 32, 1, 4, 3),
    "sca": (6, [[15, 25]], 2500, 8, 32, 4, 8, 3),
    "decoder": (1, [[50, 50]], 900, 8, 32, 1, 4, 6),
}
ROTATE_SHAPE = (256, 50, 50)


def _registry() -> CustomOpRegistry:
    reg = CustomOpRegistry()
    plugin.qdqkit_register_custom_ops(reg)
    reg.register_onnx_schemas()
    return reg


def _opts(threads: int, profile: bool = False) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    if profile:
        o.enable_profiling = True
        o.profile_file_prefix = os.path.join(tempfile.gettempdir(), "qdqkit-bench")
    return o


def _time(fn, repeat: int) -> float:
    fn()  # warm-up: first run allocates
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def _msda_inputs(B, shapes, Q, M, D, G, P, seed=0):
    rng = np.random.default_rng(seed)
    shapes = np.asarray(shapes, np.int64)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    L = len(shapes)
    return [rng.standard_normal((B, S, M, D)).astype(np.float32), shapes,
            rng.uniform(0, 1, (B, Q, 1, 2 * G)).astype(np.float32),
            rng.normal(0, 2, (B, Q, M, L * P * 2)).astype(np.float32),
            rng.standard_normal((B, Q, M, L * P)).astype(np.float32)]


def _one_node(op: str, inputs, attrs, opset: int, domain: str, fn: onnx.FunctionProto | None) -> bytes:
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op, names, ["out"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in zip(names, inputs)],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    if fn is not None:
        fn.domain, fn.name = domain, op
        model.functions.append(fn)
    return model.SerializeToString()


_PY_OPS: set[str] = set()


def _python_op_session(op: str, inputs, attrs, threads: int):
    """A session where ``op`` is an onnxruntime-extensions Python op running the plain-PyTorch forward."""
    import onnxruntime_extensions as ortx
    import torch

    from qdqkit.custom_ops import torch_ops

    kinds = {np.dtype(np.float32): ortx.PyCustomOpDef.dt_float, np.dtype(np.int64): ortx.PyCustomOpDef.dt_int64}
    domain = "qdqkit.bench"
    if op not in _PY_OPS:
        if op == "MSDA":
            def kernel(v, s, r, o, a):
                return torch_ops.ms_deform_attn_torch(*(torch.from_numpy(np.asarray(x)) for x in (v, s, r, o, a))).numpy()
        else:
            def kernel(img, angle, center, **kw):
                return torch_ops.rotate_torch(torch.from_numpy(img), torch.from_numpy(np.asarray(angle)),
                                              torch.from_numpy(center), int(kw.get("interpolation", 1))).numpy()
        ortx.onnx_op(op_type=f"{domain}::{op}", inputs=[kinds[a.dtype] for a in inputs],
                     outputs=[ortx.PyCustomOpDef.dt_float],
                     attrs={k: ortx.PyCustomOpDef.dt_int64 for k in attrs})(kernel)
        _PY_OPS.add(op)
    o = _opts(threads)
    o.register_custom_ops_library(ortx.get_library_path())
    return ort.InferenceSession(_one_node(op, inputs, attrs, 13, domain, None), o, providers=["CPUExecutionProvider"])


def bench_ops(repeat: int, threads: int) -> dict:
    """Milliseconds per call of every implementation at every BEVFormer-tiny shape."""
    results: dict = {"msda": {}, "rotate": {}}
    for name, (B, shapes, Q, M, D, G, P, calls) in MSDA_SHAPES.items():
        inputs = _msda_inputs(B, shapes, Q, M, D, G, P)
        feed = {f"in{i}": a for i, a in enumerate(inputs)}
        row = {"calls_per_frame": calls}
        for label, opset, sampler in (("function-table@13", 13, "table"), ("function-table@19", 19, "table"),
                                      ("function-gather@13", 13, "gather"), ("function-gridsample@19", 19, "gridsample")):
            fn = functions.ms_deform_attn_function(opset, sampler=sampler)
            sess = ort.InferenceSession(_one_node("MSDA", inputs, {}, opset, "trt.plugins", fn), _opts(threads),
                                        providers=["CPUExecutionProvider"])
            row[label] = 1e3 * _time(lambda s=sess: s.run(None, feed), repeat)
        try:
            sess = _python_op_session("MSDA", inputs, {}, threads)
            row["python-op"] = 1e3 * _time(lambda s=sess: s.run(None, feed), repeat)
        except ImportError:
            row["python-op"] = None
        results["msda"][name] = row
        print(f"MSDA {name:8s} " + "  ".join(f"{k} {v:7.1f} ms" for k, v in row.items()
                                              if k != "calls_per_frame" and v is not None), flush=True)

    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal(ROTATE_SHAPE).astype(np.float32), np.array(3.5, np.float32),
              np.array([100.0, 100.0], np.float32)]
    feed = {f"in{i}": a for i, a in enumerate(inputs)}
    for label, opset in (("function@13", 13), ("function@19", 19)):
        sess = ort.InferenceSession(_one_node("Rotate", inputs, {"interpolation": 1}, opset, "trt.plugins",
                                              functions.rotate_function(opset)), _opts(threads),
                                    providers=["CPUExecutionProvider"])
        results["rotate"][label] = 1e3 * _time(lambda s=sess: s.run(None, feed), repeat)
    try:
        sess = _python_op_session("Rotate", inputs, {"interpolation": 1}, threads)
        results["rotate"]["python-op"] = 1e3 * _time(lambda s=sess: s.run(None, feed), repeat)
    except ImportError:
        results["rotate"]["python-op"] = None
    print("Rotate [256,50,50] " + "  ".join(f"{k} {v:6.1f} ms" for k, v in results["rotate"].items() if v),
          flush=True)
    results["standalone_frame_ms"] = (
        sum(r["function-table@13"] * r["calls_per_frame"] for r in results["msda"].values())
        + results["rotate"]["function@13"]
    )
    return results


def _frame_inputs(sess: ort.InferenceSession) -> dict:
    from qdqkit.examples.bevformer.data import camera_rig

    rng = np.random.default_rng(0)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if i.name == "lidar2img":
            feed[i.name] = camera_rig()
        elif i.name == "use_prev_bev":
            feed[i.name] = np.ones(shape, np.float32)
        elif i.name == "can_bus":
            cb = np.zeros(shape, np.float32)
            cb[0], cb[1], cb[16], cb[17] = 2.0, 0.3, 0.5, 1.5
            feed[i.name] = cb
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def bench_frame(repeat: int, threads: int) -> dict:
    """Median BEVFormer-tiny frame time and the custom ops' share of it (from a profile of the same model)."""
    from qdqkit.examples.bevformer.export import export

    exported = export(log=lambda m: print(m, flush=True))
    reg = _registry()
    model = onnx.load(str(exported.onnx_path))
    custom = [n for n in model.graph.node if reg.lookup(n.domain, n.op_type) is not None]
    sess = reg.session(model, sess_options=_opts(threads))
    feed = _frame_inputs(sess)
    frame_s = _time(lambda: sess.run(None, feed), repeat)

    psess = reg.session(model, sess_options=_opts(threads, profile=True))
    for _ in range(2):
        psess.run(None, feed)
    path = psess.end_profiling()
    with open(path) as f:
        trace = json.load(f)
    os.unlink(path)
    # only the second run: the first one also pays for allocating every buffer
    last = max((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    events = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
              and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]]
    prefixes = ("msda/", "rot/")
    total = sum(e["dur"] for e in events)
    ops = sum(e["dur"] for e in events if any(p in e["name"] for p in prefixes))
    return {
        "model": str(exported.onnx_path),
        "custom_nodes": {t: sum(1 for n in custom if n.op_type == t) for t in sorted({n.op_type for n in custom})},
        "frame_ms": 1e3 * frame_s,
        "profile_share": ops / total if total else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-frame", action="store_true", help="only part 1 (no BEVFormer export)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; median of {args.repeat}", flush=True)
    out = {"ops": bench_ops(args.repeat, args.threads)}
    msda = out["ops"]["msda"]
    best_alt = {n: min(v for k, v in r.items() if k not in ("calls_per_frame", "function-table@13",
                                                            "function-table@19") and v is not None)
                for n, r in msda.items()}
    for n, r in msda.items():
        print(f"  {n}: the shipped table function is {best_alt[n] / r['function-table@13']:.2f}x as fast as the "
              f"best alternative")
    print(f"custom ops of one frame, standalone: {out['ops']['standalone_frame_ms']:.0f} ms "
          f"(3 TSA + 3 SCA + 6 decoder MSDA + 1 Rotate)")
    ok = True
    if not args.skip_frame:
        frame = bench_frame(max(3, args.repeat // 2), args.threads)
        frame["standalone_share"] = out["ops"]["standalone_frame_ms"] / frame["frame_ms"]
        out["frame"] = frame
        print(f"BEVFormer-tiny frame ({frame['custom_nodes']}): {frame['frame_ms']:.0f} ms")
        print(f"custom-op share of a frame: profile {100 * frame['profile_share']:.1f} %, standalone/frame "
              f"{100 * frame['standalone_share']:.1f} % (floor: at most {100 * SHARE_FLOOR:.0f} %)")
        ok = frame["profile_share"] <= SHARE_FLOOR and frame["standalone_share"] <= SHARE_FLOOR
        print("PASS" if ok else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
