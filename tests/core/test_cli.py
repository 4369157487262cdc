"""The command line as users see it: exit codes, one-line errors, untouched inputs, reports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import toymodels

from qdqkit.model import save_model

STRUCTURAL = "detect-custom-ops,trt-plugin-domain,infer-shapes,check"


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(toymodels.plugin_model(), path)
    return path


def _one_line_error(rc, err, fragment):
    lines = [line for line in err.strip().splitlines() if not line.startswith("qdqkit: [")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("qdqkit: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_apply_runs_a_pass_list_and_writes_a_report(qdqkit_cli, model_file, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    rc, _, err = qdqkit_cli("apply", model_file, "-o", out, "--passes", STRUCTURAL, "--report", report)
    assert rc == 0, err
    model = onnx.load(out)
    assert {n.domain for n in model.graph.node if n.op_type.startswith("Toy")} == {"trt.plugins"}
    data = json.loads(report.read_text())
    assert [p["pass"] for p in data["passes"]] == STRUCTURAL.split(",")
    assert data["custom_ops"]["counts"]["known-custom"] == 3
    assert all("wall_s" in p and "peak_rss_mb" in p for p in data["passes"])
    assert data["conversions"] == 0
    assert data["output_summary"]["op_histogram"]["trt.plugins::ToyScaleTRT"] == 2


def test_apply_default_recipe_and_config(qdqkit_cli, model_file, tmp_path):
    rc, _, err = qdqkit_cli("apply", model_file, "-o", tmp_path / "a.onnx", "-q")
    assert rc == 0, err
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nname = "detect-custom-ops"\n[[pass]]\nname = "trt-plugin-domain"\n'
                   'op_types = ["ToyScaleTRT"]\n')
    rc, _, err = qdqkit_cli("apply", model_file, "-o", tmp_path / "b.onnx", "--config", cfg, "-q")
    assert rc == 0, err
    domains = {n.op_type: n.domain for n in onnx.load(tmp_path / "b.onnx").graph.node}
    assert domains["ToyScaleTRT"] == "trt.plugins" and domains["ToyRowMeanTRT"] == "toy.ops"


def test_passes_ops_inspect(qdqkit_cli, model_file):
    rc, out, _ = qdqkit_cli("passes")
    assert rc == 0 and "infer-shapes" in out and "structural" in out
    rc, out, _ = qdqkit_cli("ops")
    assert rc == 0 and "(default)::ToyScaleTRT" in out and "toy.ops::ToyRowMeanTRT" in out
    assert "aliases:    toy.legacy::ToyRowMean" in out
    rc, out, _ = qdqkit_cli("inspect", model_file, "--json")
    data = json.loads(out)
    assert rc == 0 and data["custom_ops"]["known"] == ["ToyScaleTRT", "toy.ops::ToyRowMeanTRT"]
    assert data["inputs"] == [{"name": "x", "dtype": "float", "shape": [1, 8, 16]}]
    assert data["op_histogram"]["ToyScaleTRT"] == 2
    # the toy model declares no intermediate types: its 17 computed tensors show as untyped but for the output
    assert data["computed_types"] == {"untyped": 16, "float": 1}
    assert sum(data["computed_types"].values()) == sum(len(n.output) for n in onnx.load(model_file).graph.node)
    rc, out, _ = qdqkit_cli("inspect", model_file)
    assert rc == 0 and "custom ops: 3 known" in out and "computed tensors by type" in out


def _bad_cases(tmp_path, model_file):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("hello, I am text\n" * 20)
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(model_file.read_bytes()[:300])
    ext = tmp_path / "ext.onnx"
    save_model(toymodels.big_model(total_bytes=256 * 256 * 4, width=256), ext, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    nospec = tmp_path / "nospec.onnx"
    m = toymodels.plugin_model()
    m.graph.node[3].op_type = "MysteryPluginTRT"
    onnx.save(m, nospec)
    out = str(tmp_path / "out.onnx")
    return {
        "missing file": (["apply", tmp_path / "missing.onnx", "-o", out], "not found"),
        "not onnx": (["apply", not_onnx, "-o", out], "ONNX model"),
        "truncated": (["apply", truncated, "-o", out], "ONNX model"),
        "output is input": (["apply", model_file, "-o", model_file], "is the input model"),
        "output folder missing": (["apply", model_file, "-o", tmp_path / "no" / "o.onnx"], "does not exist"),
        "output folder unwritable": (["apply", model_file, "-o", "/proc/qdqkit-o.onnx", "--passes",
                                      "detect-custom-ops"], "/proc"),
        "unknown pass": (["apply", model_file, "-o", out, "--passes", "detect-custom-ops,frobnicate"],
                         "unknown pass 'frobnicate'"),
        "unknown recipe": (["apply", model_file, "-o", out, "--recipe", "nope"], "unknown recipe 'nope'"),
        "missing requirement": (["apply", model_file, "-o", out, "--passes", "infer-shapes"],
                                "add 'detect-custom-ops' before it"),
        "custom op without spec": (["apply", model_file.parent / "nospec.onnx", "-o", out, "--passes",
                                    "detect-custom-ops,infer-shapes"], "MysteryPluginTRT"),
        "external data missing": (["apply", ext, "-o", out], "ext.onnx.data"),
        "bad flag": (["apply", model_file, "-o", out, "--no-such-flag"], "unrecognized arguments"),
        "explicit broken plugin": (["-p", "qdqkit_no_such_plugin", "passes"], "qdqkit_no_such_plugin"),
    }


@pytest.mark.parametrize("case", ["missing file", "not onnx", "truncated", "output is input", "output folder missing",
                                  "output folder unwritable", "unknown pass", "unknown recipe", "missing requirement",
                                  "custom op without spec", "external data missing", "bad flag",
                                  "explicit broken plugin"])
def test_bad_input_gives_one_line_and_exit_2(qdqkit_cli, model_file, tmp_path, case):
    args, fragment = _bad_cases(tmp_path, model_file)[case]
    inputs = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rc, _, err = qdqkit_cli(*args)
    _one_line_error(rc, err, fragment)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == inputs  # nothing written or changed


def test_failure_mid_pipeline_leaves_no_output(qdqkit_cli, tmp_path):
    m = toymodels.plugin_model()
    m.graph.node[3].op_type = "MysteryPluginTRT"
    src = tmp_path / "nospec.onnx"
    onnx.save(m, src)
    dumps = tmp_path / "dumps"
    rc, _, err = qdqkit_cli("apply", src, "-o", tmp_path / "out.onnx", "--passes",
                            "detect-custom-ops,trt-plugin-domain,infer-shapes", "--dump-dir", dumps)
    assert rc == 2 and "MysteryPluginTRT" in err
    assert not (tmp_path / "out.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps", "nospec.onnx"]


def test_shape_fallback_guess_is_flagged(qdqkit_cli, tmp_path):
    m = toymodels.plugin_model()
    m.graph.node[3].op_type = "MysteryPluginTRT"
    src = tmp_path / "nospec.onnx"
    onnx.save(m, src)
    report = tmp_path / "r.json"
    rc, _, err = qdqkit_cli("apply", src, "-o", tmp_path / "out.onnx", "--passes", "detect-custom-ops,infer-shapes",
                            "--shape-fallback", "guess", "--report", report, "-q")
    assert rc == 0, err
    data = json.loads(report.read_text())
    assert data["passes"][1]["stats"]["guessed"] == [{"tensor": "s0", "op": "MysteryPluginTRT"}]
    assert data["passes"][1]["stats"]["untyped"] == 0


def test_verify_each_failure_exits_1(qdqkit_cli, model_file, tmp_path, monkeypatch):
    plug = tmp_path / "plugs"
    plug.mkdir()
    (plug / "breakplug.py").write_text(
        "import onnx\n"
        "from qdqkit.hookspecs import hookimpl\n"
        "from qdqkit.pass_infra import Pass, PassResult\n"
        "class Break(Pass):\n"
        "    name = 'break-graph'\n"
        "    def run(self, model, ctx):\n"
        "        model.proto.graph.node.append(onnx.helper.make_node('Relu', ['nowhere'], ['z']))\n"
        "        return PassResult(True)\n"
        "@hookimpl\n"
        "def qdqkit_register_passes(registry):\n"
        "    registry.add(Break)\n")
    monkeypatch.syspath_prepend(str(plug))
    out = tmp_path / "o.onnx"
    rc, _, err = qdqkit_cli("-p", "breakplug", "apply", model_file, "-o", out, "--passes",
                            "detect-custom-ops,break-graph", "--verify-each", "-q")
    assert rc == 1 and "after pass 'break-graph'" in err and "Traceback" not in err
    assert not out.exists()
    rc, _, err = qdqkit_cli("-p", "breakplug", "apply", model_file, "-o", out, "--passes",
                            "detect-custom-ops,break-graph", "-q")
    assert rc == 0, err  # without --verify-each the broken model is written: the check is what caught it


def test_console_script_and_module_entry(model_file, tmp_path):
    env_cmd = [sys.executable, "-m", "qdqkit", "-p", "qdqkit_toyops", "inspect", str(model_file), "--json"]
    env = {"PYTHONPATH": str(toymodels.__file__).rsplit("/", 1)[0], "PATH": "/usr/bin:/bin",
           "QDQKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run(env_cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["custom_ops"]["counts"]["known-custom"] == 3
    bad = subprocess.run([sys.executable, "-m", "qdqkit", "inspect", str(tmp_path / "nope.onnx")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_apply_output_runs_like_input(qdqkit_cli, model_file, tmp_path, toy_session):
    out = tmp_path / "out.onnx"
    rc, _, err = qdqkit_cli("apply", model_file, "-o", out, "--recipe", "structural", "-q")
    assert rc == 0, err
    x = np.random.default_rng(0).standard_normal((1, 8, 16)).astype(np.float32)
    a = toy_session.custom_ops.session(onnx.load(model_file)).run(None, {"x": x})[0]
    b = toy_session.custom_ops.session(onnx.load(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_inspect_leaves_external_weights_on_disk(qdqkit_cli, tmp_path):
    src = tmp_path / "ext.onnx"
    save_model(toymodels.big_model(total_bytes=2 * 256 * 256 * 4, width=256), src, external_data=True)
    rc, out, err = qdqkit_cli("inspect", src, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["custom_ops"]["counts"]["known-custom"] == 3 and data["op_histogram"]["MatMul"] == 2
    (tmp_path / "ext.onnx.data").unlink()
    rc, _, err = qdqkit_cli("inspect", src)
    _one_line_error(rc, err, "ext.onnx.data")


def test_flags_for_a_step_the_pipeline_lacks_are_refused(qdqkit_cli, model_file, tmp_path):
    rc, _, err = qdqkit_cli("apply", model_file, "-o", tmp_path / "o.onnx", "--exclude-op-types", "MatMul")
    _one_line_error(rc, err, "--exclude-op-types set options of the 'qdq' step")
    assert "only with --calib" in err
    rc, _, err = qdqkit_cli("apply", model_file, "-o", tmp_path / "o.onnx", "--passes", "detect-custom-ops",
                            "--shape-fallback", "run")
    _one_line_error(rc, err, "--shape-fallback set options of the 'infer-shapes' step")
    assert not (tmp_path / "o.onnx").exists()
