"""The ``qdqkit`` command line: apply, passes, ops, inspect, validate.

Exit codes: 0 ok, 1 validation failed, 2 bad input or usage (one line on stderr, no traceback; ``--debug``
shows it). A plugin that fails to load is named in one warning line and the rest of the CLI keeps working.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qdqkit.errors import PassContractError, UserError, ValidationFailed

PROG = "qdqkit"


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # sub-commands must not reset what was given before the sub-command name
    group = parser.add_argument_group("plugins")
    group.add_argument("-p", dest="plugins", action="append", default=[] if top else argparse.SUPPRESS,
                       metavar="NAME", help="load plugin NAME (entry-point name or module path) even with autoload "
                                            "off; -p no:NAME blocks it")
    group.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                       help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(prog=PROG, description="Plugin-based ONNX passes for plugin-laden models bound for TensorRT.")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    ap = sub.add_parser("apply", help="run a pipeline of passes on a model and write the result")
    _common(ap)
    ap.add_argument("model", metavar="MODEL", help="input .onnx (never modified)")
    ap.add_argument("-o", "--output", required=True, metavar="OUT", help="output .onnx (written atomically)")
    which = ap.add_argument_group("pipeline (one of; default: the recipe 'default')").add_mutually_exclusive_group()
    which.add_argument("--passes", metavar="A,B,C", help="explicit comma-separated pass list")
    which.add_argument("--recipe", metavar="NAME", help="a named recipe (see `qdqkit passes`)")
    which.add_argument("--config", metavar="FILE.toml", help="[[pass]] tables with name and options")
    run = ap.add_argument_group("running")
    run.add_argument("--verify-each", action="store_true", help="run the ONNX checker after every pass that changed "
                                                                 "the model")
    run.add_argument("--dump-dir", metavar="DIR", help="write the model after each pass that changed it")
    run.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    run.add_argument("--external-data", action="store_true", help="write the output's weights to OUT.data")
    run.add_argument("--shape-fallback", choices=("error", "run", "guess"),
                     help="infer-shapes through custom ops without a spec: run the model, or guess (flagged)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines or summary table")
    q = ap.add_argument_group("quantization and FP16 typing (options of the qdq, fp16 and validate steps; the "
                              "rules, --calib-samples and --plugin-precision go to qdq and fp16 alike)")
    q.add_argument("--calib", metavar="SPEC", help="calibration data: .npz, folder of .npy, or a plugin's form")
    q.add_argument("--calib-samples", type=int, metavar="N")
    q.add_argument("--exclude-op-types", nargs="+", metavar="T")
    q.add_argument("--exclude-nodes", nargs="+", metavar="REGEX", help="node names, regex, full match")
    q.add_argument("--exclude-nodes-glob", nargs="+", metavar="GLOB")
    q.add_argument("--exclude-pattern", dest="exclude_patterns", nargs="+", metavar="NAME")
    q.add_argument("--exclude-between", nargs=2, action="append", metavar=("FROM", "TO"),
                   help="every node on a path from tensor FROM to tensor TO (repeatable)")
    q.add_argument("--optional-rule", dest="optional_rules", nargs="+", metavar="LABEL",
                   help="rules allowed to match nothing (labels as the error names them, e.g. pattern:mha)")
    q.add_argument("--calibration-method", choices=("max", "entropy"))
    q.add_argument("--high-precision", choices=("fp32", "fp16"))
    q.add_argument("--plugin-precision", nargs="+", metavar="OP:SPEC")
    q.add_argument("--backend", metavar="NAME")
    q.add_argument("--data-max", type=float, metavar="X", help="fp16: nodes with a value beyond X on the "
                   "calibration samples stay FP32 (default 512)")
    q.add_argument("--fp16-io", action="store_true", default=None, help="fp16: inputs and outputs FP16 too "
                   "(default: they stay FP32)")
    q.add_argument("--val-samples", type=int, metavar="N")
    q.add_argument("--min-cosine", type=float, metavar="X")

    sp = sub.add_parser("passes", help="list the registered passes and recipes")
    _common(sp)
    op = sub.add_parser("ops", help="list the registered custom-op specs")
    _common(op)
    ip = sub.add_parser("inspect", help="custom ops, op histogram, Q/DQ coverage and I/O of a model")
    _common(ip)
    ip.add_argument("model", metavar="MODEL")
    ip.add_argument("--json", action="store_true", help="print JSON instead of text")
    vp = sub.add_parser("validate", help="compare a quantized model with its float model on held-out samples")
    _common(vp)
    vp.add_argument("float_model", metavar="FLOAT")
    vp.add_argument("quant_model", metavar="QUANT")
    vp.add_argument("--calib", required=True, metavar="SPEC")
    vp.add_argument("--start", type=int, required=True, metavar="I",
                    help="first sample index; pass the calibration sample count so that only held-out samples are "
                         "compared (apply calibrates on samples 0..calib_samples-1)")
    vp.add_argument("--samples", type=int, default=8, metavar="N")
    vp.add_argument("--min-cosine", type=float, default=0.99)
    vp.add_argument("--min-snr-db", type=float, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return _COMMANDS[args.command](args)
    except UserError as exc:
        return _fail(exc, 2, debug)
    except ValidationFailed as exc:
        return _fail(exc, 1, debug)
    except PassContractError as exc:
        return _fail(exc, 1, debug, prefix="plugin contract broken: ")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _fail(exc: BaseException, code: int, debug: bool, prefix: str = "") -> int:
    if debug:
        traceback.print_exception(exc)
    message = " ".join(str(exc).split("\n")).strip() or type(exc).__name__
    print(f"{PROG}: error: {prefix}{message}", file=sys.stderr)
    return code


def _session(args: argparse.Namespace) -> Any:
    from qdqkit.plugins import Session

    session = Session.start(args.plugins)
    for failure in session.failures:
        print(f"{PROG}: warning: {failure}", file=sys.stderr)
    try:
        session.custom_ops.register_onnx_schemas()
    except PassContractError as exc:
        raise UserError(f"custom-op schemas could not be registered: {exc}") from None
    return session


# -- apply ---------------------------------------------------------------------------------------------------


def _cli_options(args: argparse.Namespace, present: set[str]) -> dict[str, dict[str, Any]]:
    """The options the flags set, per step. The rules, --calib-samples and --plugin-precision go to the qdq and
    the fp16 step, whichever the pipeline has (to qdq where it has neither, for the error message)."""
    shared = {
        "exclude_op_types": args.exclude_op_types, "exclude_nodes": args.exclude_nodes,
        "exclude_nodes_glob": args.exclude_nodes_glob, "exclude_patterns": args.exclude_patterns,
        "exclude_between": args.exclude_between, "optional_rules": args.optional_rules,
        "plugin_precision": _plugin_precision(args.plugin_precision), "calib_samples": args.calib_samples,
    }
    qdq = {"calibration_method": args.calibration_method, "high_precision": args.high_precision,
           "backend": args.backend}
    fp16 = {"data_max": args.data_max, "keep_io_types": None if args.fp16_io is None else not args.fp16_io}
    takers = [name for name in ("qdq", "fp16") if name in present] or ["qdq"]
    for name, opts in (("qdq", qdq), ("fp16", fp16)):
        if name in takers:
            opts.update(shared)
    validate = {"samples": args.val_samples, "min_cosine": args.min_cosine}
    shapes = {"fallback": args.shape_fallback}
    return {name: {k: v for k, v in opts.items() if v is not None}
            for name, opts in (("qdq", qdq), ("fp16", fp16), ("validate", validate), ("infer-shapes", shapes))}


_FLAG_OF = {"samples": "--val-samples", "fallback": "--shape-fallback", "exclude_patterns": "--exclude-pattern",
            "optional_rules": "--optional-rule", "keep_io_types": "--fp16-io"}


def _plugin_precision(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for v in values:
        op, sep, spec = v.partition(":")
        if not sep or not op or not spec:
            raise UserError(f"--plugin-precision expects OP:SPEC (e.g. MultiScaleDeformableAttnTRT2:fp16), got {v!r}")
        out[op] = spec
    return out


def _steps(args: argparse.Namespace, session: Any) -> tuple[list[Any], str]:
    from qdqkit import pipeline as pl

    if args.passes:
        return pl.steps_from_names(args.passes), "--passes"
    if args.config:
        return pl.steps_from_toml(args.config), f"config {args.config}"
    name = args.recipe or "default"
    try:
        recipe = session.recipes.get(name)
    except UserError as exc:
        raise UserError(f"{exc}{session.failure_note()}") from None
    return pl.select_steps(recipe.steps, calib=bool(args.calib)), f"recipe {name}"


def cmd_apply(args: argparse.Namespace) -> int:
    from qdqkit import pipeline as pl
    from qdqkit.model import ModelHandle, check_output_path
    from qdqkit.pass_infra import PassContext
    from qdqkit.progress import Progress
    from qdqkit.report import Instrumentation, LibraryWarnings, Report

    src, out = Path(args.model), Path(args.output)
    if not src.exists():
        raise UserError(f"model file not found: {src}")
    check_output_path(out, src.resolve())
    if args.report:
        check_output_path(Path(args.report), src.resolve())
    if args.dump_dir and Path(args.dump_dir).exists() and not Path(args.dump_dir).is_dir():
        raise UserError(f"--dump-dir {args.dump_dir} exists and is not a folder")

    session = _session(args)
    steps, origin = _steps(args, session)
    present = {s.pass_name for s in steps}
    cli_options = _cli_options(args, present)
    for pass_name, opts in cli_options.items():
        if opts and pass_name not in present:
            flags = ", ".join(_FLAG_OF.get(k, "--" + k.replace("_", "-")) for k in opts)
            hint = " (the default recipe runs qdq and validate only with --calib)" if pass_name in ("qdq", "validate") \
                else ""
            raise UserError(f"{flags} set options of the '{pass_name}' step, which this pipeline ({origin}) does not "
                            f"have{hint}")
    steps = pl.merge_options(steps, cli_options)
    try:
        pipe = pl.Pipeline(steps, session.passes, hook=session.hook, verify_each=args.verify_each,
                           dump_dir=args.dump_dir)
    except UserError as exc:
        raise UserError(f"{exc}{session.failure_note()}") from None

    model = ModelHandle.load(src)
    report = Report()
    report.set("input", str(src))
    report.set("output", str(out))
    report.set("pipeline", {"from": origin, "steps": [s.pass_name for s in steps]})
    report.set("plugins", session.plugin_names())
    report.set("plugin_failures", [str(f) for f in session.failures])
    progress = Progress(enabled=not args.quiet)
    instrumentation = Instrumentation()
    session.pm.register(instrumentation, name="qdqkit-instrumentation")
    records: list[Any] = []
    library_warnings = LibraryWarnings(echo=not args.quiet)
    try:
        with library_warnings, tempfile.TemporaryDirectory(prefix="qdqkit-") as work:
            ctx = PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=Path(work),
                              registries=session.registries, report=report, calib_spec=args.calib,
                              progress=progress)
            try:
                pipe.run(model, ctx, records)
            finally:
                progress.close()
                report.set("passes", [r.to_dict() for r in records])
                _fill_state(report, ctx)
                report.set("conversions", model.conversions)
                report.set("library_warnings", library_warnings.to_list())
            progress(f"[save] {out}")
            model.save(out, external_data=True if args.external_data else None)
    except ValidationFailed as exc:
        report.set("failed", str(exc))
        if args.report:
            report.write(args.report)
        raise
    finally:
        session.pm.unregister(instrumentation)
    report.set("output_summary", _summary(model.proto, session, with_census=False))
    if args.report:
        report.write(args.report)
    if not args.quiet:
        print(report.table(), file=sys.stderr)
        print(f"{PROG}: wrote {out}", file=sys.stderr)
    return 0


def _fill_state(report: Any, ctx: Any) -> None:
    census = ctx.state.get("detect-custom-ops")
    if census:
        report.set("custom_ops", {"counts": census["counts"], "known": census["known"], "unknown": census["unknown"]})
    report.set("facts", sorted(ctx.facts))
    for key, value in ctx.state.items():
        if key.startswith("_") or key == "detect-custom-ops":
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        report.set(f"state:{key}", value)


# -- listing ---------------------------------------------------------------------------------------------------


def cmd_passes(args: argparse.Namespace) -> int:
    session = _session(args)
    print("passes:")
    for name in session.passes:
        cls = session.passes.get(name)
        req = f" requires {','.join(sorted(cls.requires))}" if cls.requires else ""
        prov = f" provides {','.join(sorted(cls.provides))}" if cls.provides else ""
        print(f"  {name:<22} {cls.summary} [plugin {session.passes.origin(name)}{req}{prov}]")
    print("recipes:")
    for name in session.recipes:
        recipe = session.recipes.get(name)
        steps = ",".join(s.pass_name + (f"(if {s.when})" if s.when else "") for s in recipe.steps)
        print(f"  {name:<22} {recipe.description} [{steps}; plugin {session.recipes.origin(name)}]")
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    session = _session(args)
    if not len(session.custom_ops):
        print("no custom-op specs registered")
        return 0
    for spec in session.custom_ops:
        domain = spec.domain or "(default)"
        kernels = [k for k, v in (("function", spec.function), ("python-kernel", spec.python_kernel),
                                  ("reference", spec.reference)) if v is not None]
        print(f"{domain}::{spec.op_type}  [plugin {session.custom_ops.origin(spec)}]")
        if spec.aliases:
            print("  aliases:    " + ", ".join(f"{d or '(default)'}::{t}" for d, t in spec.aliases))
        print("  inputs:     " + ", ".join(f"{i.name}{'?' if i.optional else ''}:{'|'.join(i.types)}"
                                          for i in spec.inputs))
        print("  outputs:    " + ", ".join(f"{o.name}:{'|'.join(o.types)}" for o in spec.outputs))
        if spec.attributes:
            print("  attributes: " + ", ".join(f"{a.name}:{a.type}" + ("" if a.default is None else f"={a.default}")
                                              for a in spec.attributes))
        print("  cpu:        " + (", ".join(kernels) or "none"))
        if spec.trt is not None:
            print(f"  tensorrt:   plugin {spec.trt.name} version {spec.trt.version} "
                  f"namespace {spec.trt.namespace or '(empty)'}")
            if spec.trt.formats:
                print("  formats:    " + ", ".join(f"{io}:{'|'.join(p)}" for io, p in spec.trt.formats.items()))
    return 0


# -- inspect -------------------------------------------------------------------------------------------------


def _summary(proto: Any, session: Any, *, with_census: bool = True) -> dict[str, Any]:
    import onnx

    from qdqkit.coverage import qdq_summary
    from qdqkit.customops import classify_nodes, iter_nodes
    from qdqkit.precision import computed_types

    def io(values: Any) -> list[dict[str, Any]]:
        init = {t.name for t in proto.graph.initializer}
        out = []
        for v in values:
            if v.name in init:
                continue
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim] \
                if tt.HasField("shape") else None
            dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "?"
            out.append({"name": v.name, "dtype": dtype, "shape": dims})
        return out

    hist: dict[str, int] = {}
    for n in iter_nodes(proto.graph):
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        hist[key] = hist.get(key, 0) + 1
    summary: dict[str, Any] = {
        "inputs": io(proto.graph.input), "outputs": io(proto.graph.output),
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "nodes": sum(hist.values()), "op_histogram": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    if with_census:
        census = classify_nodes(proto, session.custom_ops)
        summary["custom_ops"] = {"counts": census["counts"], "known": census["known"], "unknown": census["unknown"]}
    summary["qdq"] = qdq_summary(proto, session.custom_ops)
    summary["computed_types"] = computed_types(proto)  # as the model declares them: inspect infers nothing
    return summary




def cmd_inspect(args: argparse.Namespace) -> int:
    from qdqkit.model import ModelHandle

    session = _session(args)
    model = ModelHandle.load(args.model, external_weights=False)  # structure only: the weights stay on disk
    summary = _summary(model.proto, session)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"model: {args.model}  ({summary['nodes']} nodes; opsets "
          + ", ".join(f"{d} {v}" for d, v in summary["opsets"].items()) + ")")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for v in summary[kind]:
            print(f"  {v['name']}: {v['dtype']} {v['shape']}")
    c = summary["custom_ops"]
    print(f"custom ops: {c['counts']['known-custom']} known ({', '.join(c['known']) or '-'}), "
          f"{c['counts']['unknown-custom']} unknown ({', '.join(c['unknown']) or '-'}), "
          f"{c['counts']['contrib']} onnxruntime contrib")
    print("op histogram:")
    for op, n in summary["op_histogram"].items():
        print(f"  {n:>6}  {op}")
    print("computed tensors by type (Casts and Q/DQ aside): "
          + ", ".join(f"{k} {v}" for k, v in summary["computed_types"].items()))
    print("q/dq: " + json.dumps(summary["qdq"], default=str))
    return 0


# -- validate ------------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from qdqkit.model import ModelHandle

    session = _session(args)
    try:
        from qdqkit.calib import model_inputs, resolve_source
        from qdqkit.validation import compare
    except ImportError as exc:
        raise UserError(f"`qdqkit validate` is unavailable: {exc}") from None
    float_model = ModelHandle.load(args.float_model).proto
    quant_model = ModelHandle.load(args.quant_model).proto
    source = resolve_source(args.calib, model_inputs(float_model), session.hook)
    result = compare(float_model, quant_model, source, session.custom_ops, args.start, args.samples,
                     args.min_cosine, args.min_snr_db)
    print(result)
    if not result.passed:
        raise ValidationFailed(f"{args.quant_model} is below the thresholds against {args.float_model}")
    return 0


_COMMANDS = {"apply": cmd_apply, "passes": cmd_passes, "ops": cmd_ops, "inspect": cmd_inspect,
             "validate": cmd_validate}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
