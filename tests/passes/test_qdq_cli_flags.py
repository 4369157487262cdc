"""CLI flags that reach the qdq pass: --exclude-between, --optional-rule, --calibration-method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qdq_models  # noqa: E402

from qdqkit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return qdq_models.write_case(tmp_path_factory.mktemp("qdqflags"), 12)


def _apply(files, name, *extra):
    out, rep = files / f"{name}.onnx", files / f"{name}.json"
    rc = main(["apply", str(files / "model.onnx"), "-o", str(out), "--calib", str(files / "calib.npz"),
               "--calib-samples", "8", "--val-samples", "4", "--report", str(rep), "-q", *extra])
    return rc, out, (json.loads(rep.read_text()) if rep.exists() else None)


def _qdq_stats(report):
    return next(s for s in report["passes"] if s["pass"] == "qdq")["stats"]


def test_exclude_between_keeps_the_path_in_high_precision(files):
    rc, out, report = _apply(files, "between", "--exclude-between", "block0/ln2/LayerNorm",
                             "block0/msda/output_proj/Add", "--calibration-method", "entropy")
    assert rc == 0
    rules = _qdq_stats(report)["rules"]["by_rule"]
    (label,) = [k for k in rules if k.startswith("between:")]
    hit = set(rules[label])
    assert {"block0/msda/value_proj/MatMul", "block0/msda/output_proj/MatMul"} <= hit
    assert not any(n.startswith("block1/") or n.startswith("block0/attn/") for n in hit)
    # the excluded projections have no DequantizeLinear feeding them; the other block's do
    q = onnx.load(out)
    producer = {t: n for n in q.graph.node for t in n.output}

    def dq_fed(name):
        node = next(n for n in q.graph.node if n.name == name)
        return any(producer.get(t) is not None and producer[t].op_type == "DequantizeLinear" for t in node.input)

    assert not dq_fed("block0/msda/value_proj/MatMul")
    assert dq_fed("block1/msda/value_proj/MatMul")
    assert _qdq_stats(report)["calibration"]["method"] == "entropy"


def test_rule_matching_nothing_fails_unless_optional(files, capsys):
    rc, out, _ = _apply(files, "nothing", "--exclude-nodes", "no/such/node.*")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--optional-rule" in err and not out.exists()

    rc, out, report = _apply(files, "optional", "--exclude-nodes", "no/such/node.*",
                             "--optional-rule", "no/such/node.*")
    assert rc == 0 and out.exists()
    rules = _qdq_stats(report)["rules"]["by_rule"]
    assert rules["node:no/such/node.*"] == []
