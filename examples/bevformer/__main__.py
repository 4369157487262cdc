"""``python -m qdqkit.examples.bevformer {export,calib,demo}``.

  export  ONNX export of BEVFormer-tiny (cached; ``--force`` re-exports)
  calib   synthetic temporal calibration data as a memory-mappable folder and/or the original .npz
  demo    export + calibration data + ``qdqkit apply`` with a recipe (or both) + the report, end to end
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from qdqkit.errors import UserError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialised weights (default 0)")
    g.add_argument("--checkpoint", help="upstream-format checkpoint (.pth) instead of seeded weights")


def cmd_export(args) -> int:
    from .export import export

    res = export(seed=args.seed, variant=args.variant, checkpoint=args.checkpoint, out_dir=args.out,
                 force=args.force, log=_log)
    how = "cached, not re-exported" if res.cached else f"exported in {res.seconds:.0f} s"
    print(f"{res.onnx_path}  ({how})")
    return 0


def cmd_calib(args) -> int:
    from .calib import generate, parse_spec

    opts = parse_spec(f"bevformer:frames={args.frames},seed={args.data_seed},scene_len={args.scene_len},"
                      f"weights_seed={args.seed}")
    opts["checkpoint"] = args.checkpoint
    folder = Path(args.out) if args.out else None
    npz = Path(args.npz) if args.npz else None
    where = generate(opts, folder=folder, npz=npz, log=_log)
    print(f"{where}  (one .npy per input, memory-mappable; use --calib {where})")
    if npz is not None:
        print(f"{npz}  (original npz layout)")
    return 0


def cmd_demo(args) -> int:
    from .calib import generate, parse_spec
    from .export import export

    t_start = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    frames = args.calib_samples + args.val_samples
    _log(f"[1/3] export BEVFormer-tiny (opset 13, cp2)")
    t0 = time.perf_counter()
    exported = export(seed=args.seed, checkpoint=args.checkpoint, log=_log)
    t_export = time.perf_counter() - t0
    _log(f"      {exported.onnx_path} ({'cached' if exported.cached else f'{t_export:.0f} s'})")
    _log(f"[2/3] synthetic temporal data: {frames} frames ({args.calib_samples} calibration + "
         f"{args.val_samples} held out)")
    t0 = time.perf_counter()
    opts = parse_spec(f"bevformer:frames={frames},seed={args.data_seed},scene_len={args.scene_len},"
                      f"weights_seed={args.seed}")
    opts["checkpoint"] = args.checkpoint
    folder = generate(opts, log=_log)
    t_data = time.perf_counter() - t0
    _log(f"      {folder} ({t_data:.0f} s)")
    recipes = ["bevformer-int8", "bevformer-int8-mha"] if args.recipe == "both" else [args.recipe]
    summaries = []
    for k, recipe in enumerate(recipes):
        _log(f"[3/3] qdqkit apply --recipe {recipe}  ({k + 1}/{len(recipes)})")
        out = work / f"bevformer_tiny_cp2_op13.{recipe}.onnx"
        report = work / f"report.{recipe}.json"
        rc = _apply(exported.onnx_path, out, recipe, folder, report, args)
        if rc not in (0, 1):
            return rc
        last = None
        if rc == 0 and out.exists():
            _log("      last-decoder-layer fidelity on the held-out frames")
            last = last_layer_fidelity(exported.onnx_path, out, folder, args.calib_samples, args.val_samples)
        summaries.append((recipe, rc, json.loads(report.read_text()) if report.exists() else None, last))
    print()
    print(f"BEVFormer-tiny demo: {args.calib_samples} calibration + {args.val_samples} held-out synthetic frames, "
          f"total {time.perf_counter() - t_start:.0f} s (export {t_export:.0f} s, data {t_data:.0f} s)")
    for recipe, rc, rep, last in summaries:
        print(summarise(recipe, rep, rc, last))
    return max(s[1] for s in summaries)


def last_layer_fidelity(float_path: Path, quant_path: Path, folder: Path, start: int, count: int) -> dict:
    """Worst-sample cosine of the last decoder layer's class and box heads, quantized vs FP32.

    The validate pass compares whole outputs (all six decoder layers stacked); inference uses only the last one.
    """
    import onnx

    from qdqkit.plugins import Session
    from qdqkit.validation import cosine, evaluation_copy, evaluation_session

    from . import data as D

    ops = Session.start().custom_ops
    ops.register_onnx_schemas()
    # run and measured as the validate pass does, so the two figures printed side by side compare
    ref_s = evaluation_session(onnx.load(str(float_path)), ops)
    q_s = evaluation_session(evaluation_copy(onnx.load(str(quant_path)), ops)[0], ops)
    arrays = D.load_folder(folder)
    frames = int(arrays["image"].shape[0])
    worst: dict[str, float] = {}
    for i in range(start, min(start + count, frames)):
        sample = D.split_sample(arrays, i, frames)
        ref = ref_s.run(None, sample)
        got = q_s.run(None, sample)
        for name, r, g in (("outputs_classes[5]", ref[1][-1], got[1][-1]), ("outputs_coords[5]", ref[2][-1], got[2][-1])):
            worst[name] = min(worst.get(name, 1.0), cosine(r, g))
    return worst


def _apply(model: Path, out: Path, recipe: str, folder: Path, report: Path, args) -> int:
    from qdqkit import cli

    argv = ["apply", str(model), "-o", str(out), "--recipe", recipe, "--calib", str(folder),
            "--report", str(report),
            "--calib-samples", str(args.calib_samples), "--val-samples", str(args.val_samples)]
    try:
        return int(cli.main(argv) or 0)
    except SystemExit as exc:  # argparse and the CLI's error path exit
        return int(exc.code or 0)


def _stats(rep: dict, name: str) -> dict:
    for p in rep.get("passes", []):
        if p.get("pass") == name:
            return p.get("stats") or {}
    return {}


def summarise(recipe: str, rep: dict | None, rc: int, last_layer: dict | None = None) -> str:
    """A few lines per recipe: custom ops, Q/DQ counts, INT8 coverage, fidelity, per-pass time."""
    if rep is None:
        return f"\n== {recipe}: no report written (exit code {rc})"
    status = {0: "ok", 1: "validation below threshold"}.get(rc, "failed")
    lines = [f"\n== {recipe}  (exit code {rc}: {status})"]
    ops = (rep.get("custom_ops") or {}).get("known")
    if ops is not None:
        moved = _stats(rep, "trt-plugin-domain").get("moved", {})
        lines.append("custom ops:       " + ", ".join(f"{op} x{moved.get(op, '?')}" for op in ops))
    summary = _stats(rep, "qdq").get("summary") or {}
    if summary:
        from qdqkit.coverage import counted_ops

        by_op = summary.get("dq_inputs_by_op_type", {})
        lines.append(f"Q/DQ nodes:       {summary.get('quantize_linear')} Q, {summary.get('dequantize_linear')} DQ; "
                     "INT8 inputs by op: " + ", ".join(f"{k} {v.get('nodes')}" for k, v in sorted(by_op.items())))
        comp = summary.get("compute", {})
        lines.append(f"INT8 coverage:    {100 * summary.get('int8_coverage', 0):.1f}% of {counted_ops(summary)} FLOPs ("
                     + ", ".join(f"{k} {v.get('int8')}/{v.get('nodes')}" for k, v in sorted(comp.items())) + ")")
    fp16 = _stats(rep, "fp16")
    if fp16:
        kept = {k: len(v) for k, v in fp16.get("fp32_nodes", {}).items() if v}
        lines.append(f"FP16 typing:      {fp16.get('tensors_by_precision')} computed tensors by precision; FP32 nodes "
                     + (", ".join(f"{n} by {k}" for k, n in kept.items()) or "none")
                     + f" (ranges of {fp16.get('ranges', {}).get('tensors')} tensors on "
                     f"{fp16.get('ranges', {}).get('samples')} frames, data_max {fp16.get('ranges', {}).get('data_max')})")
    val = rep.get("validation") or _stats(rep, "validate")
    if val and val.get("outputs"):
        lines.append(f"fidelity vs FP32 on held-out frames [{val['samples']['start']}, "
                     f"{val['samples']['start'] + val['samples']['count']}) (worst-sample cosine / SNR dB):")
        for o in val["outputs"]:
            lines.append(f"  {o['name']:18s} all layers  cos {o['cosine_min']:.5f}  SNR {o['snr_db']:.1f}")
    for name, cos in (last_layer or {}).items():
        lines.append(f"  {name:18s} last layer  cos {cos:.5f}")
    passes = rep.get("passes") or []
    if passes:
        lines.append("per-pass time:    " + ", ".join(f"{p['pass']} {p.get('seconds', 0):.1f}s" for p in passes))
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qdqkit.examples.bevformer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("export", help="export BEVFormer-tiny to ONNX (cached)")
    _add_model_args(e)
    e.add_argument("--variant", type=int, choices=(1, 2), default=2,
                   help="2: *TRT2 plugin ops (cp2, default); 1: *TRT ops (cp)")
    e.add_argument("--out", help="output folder (default: the cache, $QDQKIT_CACHE/bevformer)")
    e.add_argument("--force", action="store_true", help="re-export even if cached")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("calib", help="generate synthetic temporal calibration data")
    _add_model_args(c)
    c.add_argument("--frames", type=int, default=16, help="number of frames (default 16)")
    c.add_argument("--data-seed", type=int, default=0, help="seed of the scenes and camera rig (default 0)")
    c.add_argument("--scene-len", type=int, default=40, help="frames per scene (default 40, as nuScenes)")
    c.add_argument("--out", help="folder for the .npy files (default: the cache)")
    c.add_argument("--npz", help="also write the original single-file .npz layout here")
    c.set_defaults(func=cmd_calib)

    d = sub.add_parser("demo", help="export, data, quantize, validate and report, end to end")
    _add_model_args(d)
    d.add_argument("--recipe", default="bevformer-int8",
                   choices=("bevformer-int8", "bevformer-int8-mha", "bevformer-fp16", "both"),
                   help="recipe to run (default bevformer-int8, the original; both: compare the two INT8 recipes; "
                   "bevformer-fp16: FP16 typing without INT8)")
    d.add_argument("--calib-samples", type=int, default=8, help="calibration frames (default 8)")
    d.add_argument("--val-samples", type=int, default=4, help="held-out validation frames (default 4)")
    d.add_argument("--data-seed", type=int, default=0)
    d.add_argument("--scene-len", type=int, default=6,
                   help="frames per scene (default 6, so the few demo frames include scene starts)")
    d.add_argument("--workdir", default=os.path.join(".", "bevformer-demo"), help="where outputs and reports go")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("frames", "calib_samples", "val_samples", "scene_len"):
        if getattr(args, name, 1) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
