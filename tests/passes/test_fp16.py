"""The fp16 pass through the CLI, on the seeded plugin-laden transformer (conv stem, MHA, MSDA, LayerNorm).

ModelOpt's AutoCast converts for real; value ranges are measured in onnxruntime through the MSDA ONNX-function
kernel and checked here against every tensor computed by a plain onnxruntime session; the result is run and
validated against the float model on held-out samples.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qdq_models  # noqa: E402

from qdqkit.cli import main  # noqa: E402

MSDA = qdq_models.MSDA
PASSES = "detect-custom-ops,trt-plugin-domain,infer-shapes,fp16"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return qdq_models.write_case(tmp_path_factory.mktemp("fp16"), 32)


def _apply(files, name, *extra, passes=PASSES + ",validate", calib="calib.npz"):
    out, rep = files / f"{name}.onnx", files / f"{name}.json"
    args = ["apply", str(files / "model.onnx"), "-o", str(out), "--passes", passes, "--report", str(rep), "-q"]
    if calib:
        args += ["--calib", str(files / calib), "--calib-samples", "8"]
    if "validate" in passes:
        args += ["--val-samples", "8"]
    rc = main(args + list(extra))
    return rc, out, (json.loads(rep.read_text()) if rep.exists() else None)


def _step(report, name):
    return next(s for s in report["passes"] if s["pass"] == name)["stats"]


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _every_tensor(session, model, samples):
    """Each float tensor of ``model`` over ``samples``, by a plain session that outputs all of them."""
    m = onnx.shape_inference.infer_shapes(model)
    have = {o.name for o in m.graph.output}
    floats = [v.name for v in m.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    for t in floats:
        if t not in have:
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    s = session.custom_ops.session(m)
    names = [o.name for o in s.get_outputs()]
    runs = [dict(zip(names, s.run(None, {"image": x[None]}))) for x in samples]
    return {n: np.stack([r[n] for r in runs]) for n in names}


def test_fp16_types_the_model_and_validates(files, session):
    before = hashlib.sha256((files / "model.onnx").read_bytes()).hexdigest()
    rc, out, report = _apply(files, "plain")
    assert rc == 0
    assert hashlib.sha256((files / "model.onnx").read_bytes()).hexdigest() == before
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    types = _types(q)
    # strongly typed: every tensor a node computes is fp16 except the Casts that keep the model I/O float32
    assert [t for n in q.graph.node if n.op_type != "Cast" for t in n.output if types.get(t) == TensorProto.FLOAT] == []
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in list(q.graph.input) + list(q.graph.output))
    for n in q.graph.node:
        if n.op_type in ("Conv", "MatMul"):
            assert [types[t] for t in n.input[:2]] == [TensorProto.FLOAT16] * 2, n.name
    msda = [n for n in q.graph.node if n.op_type == MSDA]
    assert len(msda) == 2 and all(n.domain == "trt.plugins" for n in msda)  # the domain the earlier pass gave
    assert not q.functions  # the CPU kernels are not written out
    stats = _step(report, "fp16")
    assert not any(stats["fp32_nodes"].values()) and stats["fp32_in_output"] == []
    assert all(c == {"value": "fp16", "reference_points": "fp16", "sampling_offsets": "fp16",
                     "attention_weights": "fp16", "output": "fp16"} for c in stats["plugin_check"].values())
    assert stats["ranges"]["samples"] == 8 and stats["ranges"]["tensors"] > 80
    val = _step(report, "validate")
    assert val["passed"] and val["samples"] == {"start": 8, "count": 8}
    assert all(o["cosine_min"] >= 0.99 for o in val["outputs"])
    # inspect says the same: every computed tensor fp16
    from qdqkit.precision import computed_types

    assert computed_types(q) == stats["tensors_by_precision"] and set(computed_types(q)) == {"float16"}
    # it runs in onnxruntime on the CPU as written (the MSDA function attached for the session)
    outs = session.custom_ops.session(q).run(None, {"image": qdq_models.calibration_images(1, seed=9)})
    assert [o.shape for o in outs] == [(1, 10), (1, 64, 32)] and all(np.isfinite(o).all() for o in outs)


def test_measured_ranges_are_every_tensors_extremes(files, session):
    from qdqkit.calib import builtin_source, model_inputs
    from qdqkit.precision import tensor_ranges

    model = onnx.load(files / "model.onnx")
    source = builtin_source(str(files / "calib.npz"), model_inputs(model))
    ranges = tensor_ranges(model, session.custom_ops, source, 3, 5)
    images = qdq_models.calibration_images(32)[3:8]
    every = _every_tensor(session, model, images)
    every["image"] = images
    # every float tensor a node computes, and the input (a Constant's value needs no range run)
    constants = {t for n in model.graph.node if n.op_type == "Constant" for t in n.output}
    assert set(ranges) == set(every) - constants
    for t, (lo, hi) in ranges.items():
        np.testing.assert_allclose([lo, hi], [every[t].min(), every[t].max()], rtol=1e-5, atol=1e-6, err_msg=t)


def test_ranges_of_a_model_whose_names_start_like_the_added_ones(session):
    """The range run's own names must not meet the model's: here an input, a tensor and a node already carry the
    names the range run would otherwise add."""
    from qdqkit.calib import ArraySource, model_inputs
    from qdqkit.precision import tensor_ranges

    x, t, y = "qdqkit_ranges_shape", "qdqkit_ranges", "qdqkit_ranges/0/min/1"
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", [x], [t], name="qdqkit_ranges/concat"),
         onnx.helper.make_node("Neg", [t], [y], name="qdqkit_ranges/0/min/reduce")],
        "names", [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [2, 3])])
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = np.array([[-2.0, 0.5, 3.0], [1.0, -4.0, 0.25]], dtype=np.float32)
    source = ArraySource({x: data}, model_inputs(model), "test data")
    ranges = tensor_ranges(model, session.custom_ops, source, 0, 1)
    assert ranges == {x: (-4.0, 3.0), t: (0.0, 3.0), y: (-3.0, -0.0)}


def test_ranges_run_reduces_each_tensor_while_the_model_runs(files, session):
    """onnxruntime runs each tensor's two reductions soon after the tensor is made (so it can be released), not
    after the whole model: with the other order of the added nodes it held every tensor to the end."""
    import json as json_

    from qdqkit.precision import float_tensors, ranges_model

    model = onnx.load(files / "model.onnx")
    tensors = float_tensors(onnx.shape_inference.infer_shapes(model))
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(files / "ranges_profile")
    measuring = ranges_model(model, tensors)
    # float32 tensors are reduced as they are: no Cast (the model's types decide, from the same inference that
    # chose the tensors)
    assert not [n for n in measuring.graph.node if n.op_type == "Cast" and n.name.startswith("qdqkit_ranges")]
    s = session.custom_ops.session(measuring, sess_options=so)
    s.run(None, {"image": qdq_models.calibration_images(1)})
    events = json_.loads(Path(s.end_profiling()).read_text())
    order = [e["name"][:-len("_kernel_time")] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    reductions = [i for i, n in enumerate(order) if n.startswith("qdqkit_ranges/") and n.endswith("/reduce")]
    model_nodes = [i for i, n in enumerate(order) if not n.startswith("qdqkit_ranges")]
    assert len(reductions) > len(tensors)  # (those of tensors computed from constants are folded away)
    # the reductions are spread through the run: half of them before the model's last node has run ...
    assert reductions[len(reductions) // 2] < model_nodes[-1]
    # ... in the order the tensors are made
    first = [order[i].split("/")[1] for i in reductions[::2]]
    assert [int(k) for k in first] == sorted(int(k) for k in first)


def test_nodes_beyond_data_max_stay_fp32_and_no_others(files, session):
    rc, out, report = _apply(files, "datamax", "--data-max", "3")
    assert rc == 0
    stats = _step(report, "fp16")
    kept = set(stats["fp32_nodes"]["range"])
    assert kept and stats["fp32_nodes"]["rule"] == [] and stats["fp32_nodes"]["plugin"] == []
    # every node kept for its range has an input or output past 3 on the 8 range samples, and no other node has
    model = onnx.load(files / "model.onnx")
    every = _every_tensor(session, model, qdq_models.calibration_images(32)[:8])
    every["image"] = qdq_models.calibration_images(32)[:8]
    inits = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        io = [t for t in list(n.input) + list(n.output) if t and t not in inits and t in every]
        assert (n.name in kept) == any(np.abs(every[t]).max() > 3 for t in io), n.name
    q = onnx.load(out)
    types = _types(q)
    names = {n.name: n for n in q.graph.node}
    for name in kept & set(names):
        assert all(types.get(t) != TensorProto.FLOAT16 for t in names[name].output), name
    # both MSDA nodes see values past 3, so they run in fp32, which their formats allow
    assert all(set(c.values()) == {"fp32"} for c in stats["plugin_check"].values())
    assert _step(report, "validate")["passed"]


def test_rules_and_plugin_precision_keep_nodes_fp32(files):
    rc, out, report = _apply(files, "rules", "--exclude-op-types", "Softmax", "--plugin-precision", f"{MSDA}:fp32")
    assert rc == 0
    stats = _step(report, "fp16")
    assert set(stats["fp32_nodes"]["rule"]) == {"block0/attn/softmax", "block1/attn/softmax"}
    assert set(stats["fp32_nodes"]["plugin"]) == {f"block{i}/msda/{MSDA}" for i in range(2)}
    assert stats["rules"]["by_rule"]["op-type:Softmax"]
    q = onnx.load(out)
    types = _types(q)
    for n in q.graph.node:
        if n.op_type == "Softmax":
            assert types[n.output[0]] == TensorProto.FLOAT
        if n.op_type == MSDA:
            assert types[n.input[0]] == types[n.output[0]] == TensorProto.FLOAT
        if n.op_type == "Conv":
            assert types[n.output[0]] == TensorProto.FLOAT16


def test_without_data_the_report_says_ranges_were_not_checked(files):
    rc, _, report = _apply(files, "nodata", passes=PASSES, calib=None)
    assert rc == 0
    stats = _step(report, "fp16")
    assert stats["ranges"]["tensors"] == 0 and "not checked" in stats["notes"][0]
    assert stats["tensors_by_precision"] == {"float16": 85}


def test_autocast_reference_run_never_runs(files, monkeypatch):
    """qdqkit decides the FP32 nodes itself; AutoCast's reference run (random inputs without data, TensorRT's
    provider for custom ops) must not run, with or without data."""
    from modelopt.onnx.autocast import referencerunner

    def refuse(*_a, **_k):
        raise AssertionError("AutoCast's reference run ran")

    monkeypatch.setattr(referencerunner.ReferenceRunner, "run", refuse)
    assert _apply(files, "noref", passes=PASSES, calib=None)[0] == 0
    assert _apply(files, "noref_data", "--data-max", "3", passes=PASSES)[0] == 0


def test_fp16_io(files):
    rc, out, _ = _apply(files, "io16", "--fp16-io", passes=PASSES)
    assert rc == 0
    q = onnx.load(out)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in list(q.graph.input) + list(q.graph.output))


def _qdq_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("case", ["qdq-model", "data-max", "validate-without-data", "plugin-precision",
                                  "fp16-flags-without-fp16"])
def test_bad_input_is_one_line_and_exit_2(files, capsys, case):
    if case == "qdq-model":
        _qdq_model(files / "qdq.onnx")
        argv = ["apply", str(files / "qdq.onnx"), "-o", str(files / "bad.onnx"), "--passes", "fp16"]
        want = "has Q/DQ nodes"
    elif case == "data-max":
        argv = ["apply", str(files / "model.onnx"), "-o", str(files / "bad.onnx"), "--passes", PASSES,
                "--data-max", "-1"]
        want = "data_max must be a positive number"
    elif case == "validate-without-data":
        argv = ["apply", str(files / "model.onnx"), "-o", str(files / "bad.onnx"), "--passes", PASSES + ",validate"]
        want = "needs samples: give --calib"
    elif case == "plugin-precision":
        argv = ["apply", str(files / "model.onnx"), "-o", str(files / "bad.onnx"), "--passes", PASSES,
                "--plugin-precision", f"{MSDA}:value=fp16,*=fp32"]
        want = "must be 'fp16' or 'fp32' (the whole op)"
    else:  # the fp16 pass's own flags, to a pipeline without it
        argv = ["apply", str(files / "model.onnx"), "-o", str(files / "bad.onnx"), "--passes", "infer-shapes",
                "--data-max", "100", "--fp16-io"]
        want = "--data-max, --fp16-io set options of the 'fp16' step"
    capsys.readouterr()
    assert main(argv + ["-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0] and "Traceback" not in err[0], err
    assert not (files / "bad.onnx").exists()


def test_heavy_models_are_inferred_without_their_weights(files, monkeypatch):
    """Past qdqkit.model.LIGHT_WEIGHTS, shape inference runs on a copy without the weights' bytes (onnx serializes
    what it is given, which fails past 2 GB): the same model comes out."""
    from qdqkit import model as qmodel

    rc, light, _ = _apply(files, "light", passes=PASSES, calib=None)
    calls = []
    original = qmodel.structure_only
    monkeypatch.setattr(qmodel, "LIGHT_WEIGHTS", 0)
    monkeypatch.setattr(qmodel, "structure_only", lambda *a, **k: calls.append(1) or original(*a, **k))
    rc2, heavy, _ = _apply(files, "heavy", passes=PASSES, calib=None)
    assert rc == rc2 == 0 and calls
    assert onnx.load(light).SerializeToString() == onnx.load(heavy).SerializeToString()


def _big_constant_model(kind: str):
    """x @ w (small) minus and plus a constant of 1e5 that reaches Sub and Add through ``kind``: a Cast of a
    float64 initializer (which AutoCast's clean-up folds away), a Constant's value_float, a ConstantOfShape, or
    a Neg of an initializer."""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    inits = [numpy_helper.from_array(np.full((16, 16), 1e-3, np.float32), "w")]
    if kind == "cast":
        inits.append(numpy_helper.from_array(np.full((16,), 1e5, np.float64), "b64"))
        make = [helper.make_node("Cast", ["b64"], ["b"], to=TensorProto.FLOAT, name="castb")]
    elif kind == "value_float":
        make = [helper.make_node("Constant", [], ["b"], value_float=1e5, name="constb")]
    elif kind == "constant_of_shape":
        inits.append(numpy_helper.from_array(np.array([16], np.int64), "n"))
        make = [helper.make_node("ConstantOfShape", ["n"], ["b"], name="fillb",
                                 value=numpy_helper.from_array(np.array([1e5], np.float32)))]
    else:
        inits.append(numpy_helper.from_array(np.full((16,), -1e5, np.float32), "nb"))
        make = [helper.make_node("Neg", ["nb"], ["b"], name="negb")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), *make,
             helper.make_node("Sub", ["h", "b"], ["h2"], name="sub"),
             helper.make_node("Add", ["h2", "b"], ["y"], name="add")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["cast", "value_float", "constant_of_shape", "neg"])
def test_constants_beyond_fp16_keep_their_consumers_fp32(tmp_path, kind):
    """Without data, the initializer rule alone must keep Sub and Add FP32, and the output must stay finite."""
    onnx.save(_big_constant_model(kind), tmp_path / "m.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["apply", str(tmp_path / "m.onnx"), "-o", str(out), "--passes", "fp16", "--report", str(rep), "-q"]) == 0
    stats = _step(json.loads(rep.read_text()), "fp16")
    assert {"sub", "add"} <= set(stats["fp32_nodes"]["initializer"]) and stats["fp32_nodes"]["range"] == []
    feed = {"x": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)}
    want = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feed)[0]
    got = ort.InferenceSession(str(out)).run(None, feed)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02)  # the MatMul alone is FP16


def test_fp16_io_with_inputs_past_data_max(tmp_path):
    """Inputs of about 2000 (past data_max, within FP16): the first MatMul stays FP32 by range, and the FP16
    inputs and outputs asked for are not held against the pass."""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "w")
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=(np.random.default_rng(0).standard_normal((32, 16)) * 2000).astype(np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["apply", str(tmp_path / "m.onnx"), "-o", str(out), "--passes", "fp16,validate", "--calib",
                 str(tmp_path / "c.npz"), "--calib-samples", "4", "--val-samples", "4", "--fp16-io", "--report",
                 str(rep), "-q"]) == 0
    stats = _step(json.loads(rep.read_text()), "fp16")
    assert "mm" in stats["fp32_nodes"]["range"]
    q = onnx.load(out)
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_fp16_io_validates(files):
    rc, _, report = _apply(files, "io16val", "--fp16-io")
    assert rc == 0 and _step(report, "validate")["passed"]


def test_quiet_runs_print_nothing(files, capfd):
    """ModelOpt, onnxruntime's calibrator and onnx's version converter print to stdout; -q output stays empty."""
    import logging

    import modelopt.onnx  # noqa: F401 - its import installs ModelOpt's handler

    handlers = list(logging.getLogger("modelopt.onnx").handlers)
    capfd.readouterr()
    assert _apply(files, "quiet_fp16", passes=PASSES)[0] == 0
    assert _apply(files, "quiet_qdq", "--calibration-method", "entropy", "--exclude-op-types", "MatMul",
                  passes="detect-custom-ops,trt-plugin-domain,infer-shapes,qdq")[0] == 0
    out, err = capfd.readouterr()
    assert out == ""
    assert not any(s in err for s in ("Collecting tensor data", "Shared constants", "version converter")), err
    # ModelOpt's handler was kept off only while it ran (modelopt_compat's patch 10)
    assert handlers and logging.getLogger("modelopt.onnx").handlers == handlers


TINY_VALUE_WARNING = "Some initializers contain values smaller than smallest fp16 value"


@pytest.mark.parametrize("step", ["fp16", "qdq --high-precision fp16"])
def test_modelopts_own_warnings_are_shown_once_and_not_under_quiet(tmp_path, step):
    """A warning ModelOpt logs through its own logger (AutoCast replacing an initializer value below FP16's
    smallest, here one of plain_cnn's biases, in the fp16 pass and in ModelOpt's quantize) is shown once in
    qdqkit's format, and not at all under -q; the report counts it either way. Run as a user runs qdqkit, in a
    process of its own, so that ModelOpt's stdout handler writes to the real stdout."""
    import subprocess

    from onnx import numpy_helper

    model = qdq_models.plain_cnn()
    bias = next(i for i in model.graph.initializer if i.name == "fc.bias")
    values = numpy_helper.to_array(bias).copy()
    values[0] = 1e-9
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", image=qdq_models.calibration_images(8))
    passes = ["--passes", "fp16"] if step == "fp16" else \
        ["--passes", "qdq", "--calib", str(tmp_path / "c.npz"), "--calib-samples", "8", "--high-precision", "fp16"]
    for quiet in (True, False):
        rep = tmp_path / f"r{quiet}.json"
        proc = subprocess.run([sys.executable, "-m", "qdqkit", "apply", str(tmp_path / "m.onnx"), "-o",
                               str(tmp_path / "o.onnx"), *passes, "--report", str(rep), *(["-q"] * quiet)],
                              check=False, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        (entry,) = json.loads(rep.read_text())["library_warnings"]
        assert entry["logger"] == "modelopt.onnx.autocast" and entry["count"] == 1
        assert entry["message"].startswith(TINY_VALUE_WARNING)
        assert proc.stdout == ""
        if quiet:
            assert proc.stderr == ""
        else:
            assert proc.stderr.count(TINY_VALUE_WARNING) == 1
            assert f"qdqkit: warning from modelopt.onnx.autocast: {entry['message']}\n" in proc.stderr


def test_if_bodies_stay_fp32_and_the_report_says_so(tmp_path):
    """AutoCast leaves the body of an If as it is: a branch whose values pass FP16's range (x * 1000, x = 100)
    computes in FP32 and the output stays finite, and the report names the node whose body was not judged."""
    from onnx import numpy_helper

    c = numpy_helper.from_array(np.array([1000.0], np.float32), "c")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "c"], ["big"], name="then_mul"),
                                helper.make_node("Div", ["big", "c"], ["t_out"], name="then_div")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 3])], [c])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 3])])
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [helper.make_node("ReduceMax", ["x"], ["s"], name="max", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y0"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["y0"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [zero])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.full((8, 3), 100.0, np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["apply", str(tmp_path / "m.onnx"), "-o", str(out), "--passes", "fp16", "--calib",
                 str(tmp_path / "c.npz"), "--calib-samples", "4", "--report", str(rep), "-q"]) == 0
    stats = _step(json.loads(rep.read_text()), "fp16")
    assert any("3 nodes inside the bodies of branch stay FP32" in n for n in stats["notes"])
    q = onnx.load(out)
    (node,) = [n for n in q.graph.node if n.op_type == "If"]
    for a in node.attribute:
        assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in a.g.output)
    feed = {"x": np.full((2, 3), 100.0, np.float32)}
    np.testing.assert_array_equal(ort.InferenceSession(str(out)).run(None, feed)[0], feed["x"])


def test_range_run_names_avoid_names_inside_bodies():
    """Names in an If body (here an unused initializer of its branch) share the model's name scope: the range
    run's prefix must avoid them too."""
    from onnx import numpy_helper

    from qdqkit.precision import _free_prefix

    body = helper.make_graph([helper.make_node("Identity", ["x"], ["t"], name="id")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
                             [numpy_helper.from_array(np.zeros(1, np.float32), "qdqkit_ranges_unused")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="branch", then_branch=body, else_branch=other)],
                          "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert _free_prefix(g, "qdqkit_ranges") == "qdqkit_ranges__"  # "qdqkit_ranges_" starts the body's name
