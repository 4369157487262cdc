"""The README's examples run: its pass and custom-op plugin code, loaded with -p, and its pipeline TOML."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qdqkit.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(lang: str, after: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after):]
    section = section[: section.index("\n## ", 3)]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


@pytest.fixture
def readme_plugin(tmp_path, monkeypatch):
    code = _blocks("python", "## Writing a pass")[0] + "\n\n" + _blocks("python", "## Writing a custom-op plugin")[0]
    (tmp_path / "readme_plugin.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "readme_plugin"
    sys.modules.pop("readme_plugin", None)


def test_plugin_examples_run(tmp_path, readme_plugin, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("MyDoubleTRT", ["x"], ["d"], name="double"),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(nodes, "readme", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)

    assert main(["passes", "-p", readme_plugin]) == 0
    assert "rename-inputs" in capsys.readouterr().out
    rc = main(["apply", str(src), "-o", str(out), "-p", readme_plugin, "-q", "--passes",
               "detect-custom-ops,trt-plugin-domain,infer-shapes,rename-inputs,check"])
    assert rc == 0, capsys.readouterr().err
    q = onnx.load(out)
    assert [i.name for i in q.graph.input] == ["in_x"]
    assert q.graph.node[0].domain == "trt.plugins" and not q.functions  # no function written for TensorRT

    from qdqkit.plugins import Session

    session = Session.start([readme_plugin])
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    (got,) = session.custom_ops.session(q).run(None, {"in_x": a})
    np.testing.assert_allclose(got, np.maximum(2 * a, 0), rtol=1e-6)


def test_pipeline_toml_example_runs(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
    import qdq_models

    (toml,) = _blocks("toml", "## Command line")
    (tmp_path / "pipeline.toml").write_text(toml)
    onnx.save(qdq_models.transformer_msda(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", image=qdq_models.calibration_images(24))
    rc = main(["apply", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--config",
               str(tmp_path / "pipeline.toml"), "--calib", str(tmp_path / "calib.npz"), "-q",
               "--report", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["detect-custom-ops", "trt-plugin-domain", "infer-shapes",
                                                      "qdq", "validate"]
    assert next(p for p in report["passes"] if p["pass"] == "validate")["stats"]["passed"]
