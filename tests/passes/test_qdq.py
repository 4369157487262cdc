"""The qdq pass through the CLI, on the seeded plugin-laden transformer (conv stem, MHA, MSDA, LayerNorm).

Every run calibrates for real with ModelOpt on the CPU through the MSDA ONNX-function kernel and validates in
onnxruntime against the float model on held-out samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qdq_models  # noqa: E402

from qdqkit.cli import main  # noqa: E402

MSDA = qdq_models.MSDA


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return qdq_models.write_case(tmp_path_factory.mktemp("qdq"), 32, npy_folder=True)


def _apply(files, name, *extra, calib="calib.npz"):
    out, rep = files / f"{name}.onnx", files / f"{name}.json"
    rc = main(["apply", str(files / "model.onnx"), "-o", str(out), "--calib", str(files / calib),
               "--calib-samples", "16", "--val-samples", "8", "--report", str(rep), "-q", *extra])
    return rc, out, (json.loads(rep.read_text()) if rep.exists() else None)


def _step(report, name):
    return next(s for s in report["passes"] if s["pass"] == name)["stats"]


def _dq_fed(model, node_name):
    producer = {t: n for n in model.graph.node for t in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)

    def dq(t):
        p = producer.get(t)
        while p is not None and p.op_type == "Cast":
            p = producer.get(p.input[0])
        return p is not None and p.op_type == "DequantizeLinear"

    return [dq(t) for t in node.input[:2]]


def _run_cpu(session, model, high):
    so = ort.SessionOptions()
    if high == "fp16":
        # onnxruntime 1.24's SimplifiedLayerNormFusion fails at session creation on the fp16 decomposed
        # LayerNorm of the mha variant (it references a Cast it inserted and removed itself): basic level
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = session.custom_ops.session(model, sess_options=so)
    x = qdq_models.calibration_images(1, seed=9)
    return s.run(None, {"image": x})


@pytest.mark.parametrize("high", ["fp32", "fp16"])
@pytest.mark.parametrize("rule", [["--exclude-op-types", "MatMul"], ["--exclude-pattern", "mha"]],
                         ids=["exclude-matmul", "exclude-mha"])
def test_apply_checks_runs_and_validates(files, session, rule, high):
    before = hashlib.sha256((files / "model.onnx").read_bytes()).hexdigest()
    cwd_before = set(os.listdir(os.getcwd()))
    rc, out, report = _apply(files, f"{rule[1]}_{high}", *rule, "--high-precision", high)
    assert rc == 0
    assert hashlib.sha256((files / "model.onnx").read_bytes()).hexdigest() == before
    assert set(os.listdir(os.getcwd())) == cwd_before  # no ModelOpt droppings in the working directory

    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    outs = _run_cpu(session, q, high)
    assert [o.shape for o in outs] == [(1, 10), (1, 64, 32)] and all(np.isfinite(o).all() for o in outs)

    val = _step(report, "validate")
    assert val["passed"] and val["samples"] == {"start": 16, "count": 8}
    assert {o["name"] for o in val["outputs"]} == {"logits", "tokens"}
    assert all(o["cosine_min"] >= 0.99 for o in val["outputs"])

    stats = _step(report, "qdq")
    assert stats["summary"]["quantize_linear"] > 0 and stats["summary"]["int8_coverage"] > 0
    # nothing downstream of MSDA is silently left with only its weight quantized
    assert stats["downstream_of_custom_ops"]["weight_only"] == []
    if rule[1] == "MatMul":
        assert stats["rules"]["by_rule"]["op-type:MatMul"] and all(
            _dq_fed(q, n.name) == [False, False] for n in q.graph.node if n.op_type == "MatMul")
        assert _dq_fed(q, "stem/conv2") == [True, True]
    else:
        attn = {"block0/attn/scores", "block0/attn/context", "block1/attn/scores", "block1/attn/context"}
        assert attn <= set(stats["rules"]["by_rule"]["pattern:mha"])
        assert all(_dq_fed(q, n) == [False, False] for n in attn)
        for n in ("block0/msda/output_proj/MatMul", "block1/msda/value_proj/MatMul", "block1/attn/q_proj/MatMul"):
            assert _dq_fed(q, n) == [True, True], n
            assert n in stats["downstream_of_custom_ops"]["int8"] or n.startswith("block0/msda/value")
    if high == "fp16":
        inferred = onnx.shape_inference.infer_shapes(q)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        types.update({t.name: t.data_type for t in q.graph.initializer})
        # strongly typed for TensorRT 11: every tensor a node computes is fp16 (or int8), except the Casts that
        # restore the fp32 model outputs
        fp32 = [t for n in q.graph.node if n.op_type != "Cast" for t in n.output if types.get(t) == TensorProto.FLOAT]
        assert fp32 == []
        for n in q.graph.node:
            if n.op_type in ("Conv", "MatMul"):
                assert [types[t] for t in n.input[:2]] == [TensorProto.FLOAT16] * 2, n.name
        assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in q.graph.output)
        # the MSDA function runs any float type, so MSDA gets fp16 (its TensorRT formats allow it)
        for node_check in stats["plugin_check"].values():
            assert node_check == {"value": "fp16", "reference_points": "fp16", "sampling_offsets": "fp16",
                                  "attention_weights": "fp16", "output": "fp16"}
        assert any("truncates float16" in n for n in val["notes"])
    else:
        assert all(v == "fp32" for c in stats["plugin_check"].values() for v in c.values())


@pytest.mark.parametrize("high, ref", [("fp32", "fp32"), ("fp16", "fp16")])
def test_int8_plugin_io_node_by_node(files, session, high, ref):
    spec = f"{MSDA}:value=int8,sampling_offsets=int8,attention_weights=int8,output=int8,reference_points={ref}"
    rc, out, report = _apply(files, f"int8plugin_{high}", "--exclude-op-types", "MatMul", "--high-precision", high,
                             "--plugin-precision", spec)
    assert rc == 0
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)  # the schemas accept the INT8 the plugin accepts
    producer = {t: n for n in q.graph.node for t in n.output}
    readers = {}
    for n in q.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n.op_type)
    msda = [n for n in q.graph.node if n.op_type == MSDA]
    assert len(msda) == 2
    for n in msda:
        kinds = [producer[t].op_type if t in producer else "initializer" for t in n.input]
        assert kinds[0] == kinds[3] == kinds[4] == "QuantizeLinear", kinds   # INT8 straight into the plugin
        assert kinds[2] != "QuantizeLinear"
        assert readers[n.output[0]] == ["DequantizeLinear"]                  # INT8 straight out of it
        vi = {v.name: v.type.tensor_type.elem_type for v in q.graph.value_info}
        assert vi[n.output[0]] == TensorProto.INT8
    stats = _step(report, "qdq")
    assert all(c["value"] == "int8" and c["reference_points"] == ref for c in stats["plugin_check"].values())
    val = _step(report, "validate")
    assert val["passed"] and any("INT8 plugin" in note for note in val["notes"])


def test_ort_backend_and_npy_folder(files, session):
    rc, out, report = _apply(files, "ort", "--exclude-pattern", "mha", "--backend", "ort", calib="folder")
    assert rc == 0
    stats = _step(report, "qdq")
    assert stats["backend"] == "ort" and "calibration folder" in stats["calibration"]["source"]
    assert stats["summary"]["quantize_linear"] > 0 and _step(report, "validate")["passed"]
    onnx.checker.check_model(onnx.load(out), full_check=True)


def _one_line_exit_2(capsys, argv, *words):
    rc = main([*argv, "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("arrays, words", [
    ({"img": None}, ["no data for model input 'image'"]),
    ({"image": (20, 3, 8, 8)}, ["'image'", "shape", "[1,3,16,16]"]),
    ({"image": "f64"}, ["'image'", "float64", "float32"]),
    ({"image": (10, 3, 16, 16)}, ["calibration needs 16 samples", "only 10"]),
], ids=["missing-input", "wrong-shape", "wrong-dtype", "too-few"])
def test_bad_calibration_data(files, tmp_path, capsys, arrays, words):
    data = {}
    for k, v in arrays.items():
        if v is None:
            data[k] = qdq_models.calibration_images(20)
        elif v == "f64":
            data[k] = qdq_models.calibration_images(20).astype(np.float64)
        else:
            data[k] = np.zeros(v, np.float32)
    np.savez(tmp_path / "bad.npz", **data)
    out = tmp_path / "out.onnx"
    _one_line_exit_2(capsys, ["apply", str(files / "model.onnx"), "-o", str(out), "--calib", str(tmp_path / "bad.npz"),
                              "--calib-samples", "16", "--exclude-op-types", "MatMul"], *words)
    assert not out.exists()


@pytest.mark.parametrize("flags, words", [
    (["--exclude-op-types", "Matmul"], ["op-type:Matmul matches no node", "did you mean MatMul"]),
    (["--exclude-nodes", "block0/attn"], ["node:block0/attn matches no node"]),
    (["--exclude-pattern", "attention"], ["unknown exclusion pattern 'attention'", "mha"]),
    (["--plugin-precision", f"{MSDA}:reference_points=int8"], ["does not accept int8"]),
], ids=["op-type", "regex-full-match", "unknown-pattern", "plugin-format"])
def test_bad_rules(files, tmp_path, capsys, flags, words):
    out = tmp_path / "out.onnx"
    _one_line_exit_2(capsys, ["apply", str(files / "model.onnx"), "-o", str(out), "--calib", str(files / "calib.npz"),
                              *flags], *words)
    assert not out.exists()


def test_custom_op_without_cpu_kernel(tmp_path, capsys):
    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("NoKernelScaleTRT", ["x"], ["h"], name="plugin"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.ones((20, 16), np.float32))
    _one_line_exit_2(capsys, ["apply", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "-p",
                              "qdq_nokernel_plugin", "--calib", str(tmp_path / "c.npz"), "--passes", "qdq"],
                     "NoKernelScaleTRT", "no CPU implementation")


def test_rules_from_a_toml_pipeline(files, tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('''
[[pass]]
name = "qdq"
calib_samples = 8
exclude_between = [["block1/ln2/Add_1", "block1/msda/output_proj/Add"]]
exclude_nodes_glob = ["head/*"]
exclude_patterns = ["mha", "layernorm"]
exclude_op_types = ["Gemm"]
optional_rules = ["op-type:Gemm"]
''')
    rep = tmp_path / "r.json"
    rc = main(["apply", str(files / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib", str(files / "calib.npz"),
               "--config", str(cfg), "--report", str(rep), "-q"])
    assert rc == 0
    by_rule = _step(json.loads(rep.read_text()), "qdq")["rules"]["by_rule"]
    assert by_rule["op-type:Gemm"] == []
    assert "block1/msda/MultiScaleDeformableAttnTRT2" in by_rule[
        "between:block1/ln2/Add_1..block1/msda/output_proj/Add"]
    assert by_rule["node-glob:head/*"] == ["head/tokens", "head/pool", "head/fc/MatMul", "head/fc/Add", "head/logits"]
    assert len(by_rule["pattern:layernorm"]) == 2 + 18
    q = onnx.load(tmp_path / "o.onnx")
    assert _dq_fed(q, "block1/msda/output_proj/MatMul") == [False, False]
    assert _dq_fed(q, "block0/msda/output_proj/MatMul") == [True, True]


def test_unknown_op_is_refused_before_calibration(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("MysteryTRT", ["x"], ["y"], name="m")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.ones((20, 4), np.float32))
    _one_line_exit_2(capsys, ["apply", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                              "--calib", str(tmp_path / "c.npz"), "--passes", "qdq", "--exclude-op-types", "MysteryTRT"],
                     "MysteryTRT", "neither standard ONNX nor a registered custom op")
