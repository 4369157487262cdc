"""`qdqkit validate` and the validate pass: held-out samples, thresholds, exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qdq_models  # noqa: E402

from qdqkit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    onnx.save(qdq_models.transformer_msda(), d / "model.onnx")
    onnx.save(qdq_models.transformer_msda(seed=5), d / "other.onnx")
    np.savez(d / "calib.npz", image=qdq_models.calibration_images(24))
    rc = main(["apply", str(d / "model.onnx"), "-o", str(d / "q.onnx"), "--calib", str(d / "calib.npz"),
               "--calib-samples", "16", "--passes", "detect-custom-ops,infer-shapes,qdq", "--exclude-pattern", "mha",
               "-q"])
    assert rc == 0
    return d


def test_validate_command_passes_on_held_out_samples(quantized, capsys):
    d = quantized
    rc = main(["validate", str(d / "model.onnx"), str(d / "q.onnx"), "--calib", str(d / "calib.npz"),
               "--start", "16", "--samples", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "samples [16, 24)" in out and "logits" in out and "tokens" in out


def test_validate_command_fails_with_exit_1(quantized, capsys):
    d = quantized
    rc = main(["validate", str(d / "other.onnx"), str(d / "q.onnx"), "--calib", str(d / "calib.npz"),
               "--start", "16", "--samples", "4"])
    captured = capsys.readouterr()
    assert rc == 1
    assert " NO" in captured.out and "below the thresholds" in captured.err


def test_validate_command_too_few_samples(quantized, capsys):
    d = quantized
    rc = main(["validate", str(d / "model.onnx"), str(d / "q.onnx"), "--calib", str(d / "calib.npz"),
               "--start", "16", "--samples", "20"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "has only 24" in err


def test_validate_pass_threshold_stops_the_pipeline(quantized, capsys):
    d = quantized
    rep = d / "strict.json"
    rc = main(["apply", str(d / "model.onnx"), "-o", str(d / "strict.onnx"), "--calib", str(d / "calib.npz"),
               "--calib-samples", "16", "--val-samples", "4", "--min-cosine", "0.999999", "--exclude-pattern", "mha",
               "--report", str(rep), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "validation failed" in err and "cosine" in err
    # the report still says what ran and what validation measured
    report = json.loads(rep.read_text())
    steps = [p["pass"] for p in report["passes"]]
    assert steps == ["detect-custom-ops", "trt-plugin-domain", "infer-shapes", "qdq", "validate"]
    val = report["passes"][-1]["stats"]
    assert val["passed"] is False and "validation failed" in val["failed"] and val["outputs"]
