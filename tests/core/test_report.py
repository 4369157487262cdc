"""Report writing, the summary table, instrumentation figures and the progress display."""

from __future__ import annotations

import io
import json
import time

import pytest

from qdqkit.progress import Progress
from qdqkit.report import Report, peak_rss, reset_peak_rss


def test_report_json_and_table(tmp_path):
    report = Report()
    report.set("passes", [{"pass": "detect-custom-ops", "modified": False, "wall_s": 0.01, "peak_rss_mb": 100.0,
                           "nodes_before": 5, "nodes_after": 5, "stats": {}},
                          {"pass": "simplify", "modified": False, "wall_s": 0.5, "peak_rss_mb": 120.0,
                           "nodes_before": 5, "nodes_after": 5, "stats": {"skipped": "model over 2 GB"}}])
    report.set("facts", {"shapes"})
    path = tmp_path / "r.json"
    report.write(path)
    data = json.loads(path.read_text())
    assert data["facts"] == ["shapes"] and data["qdqkit_report"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    table = report.table().splitlines()
    assert table[0].split()[:3] == ["pass", "changed", "time"]
    assert "skipped: model over 2 GB" in table[-1]


def test_peak_rss_reset_measures_what_follows():
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs: per-pass peaks fall back to the process peak (peak_is_per_pass)")
    low = peak_rss()
    block = bytearray(64 * 2**20)  # touch 64 MiB
    block[:: 4096] = b"x" * len(block[:: 4096])
    assert peak_rss() - low > 48 * 2**20
    del block
    reset_peak_rss()
    assert peak_rss() < low + 48 * 2**20


def test_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(out, live=False)
    progress("[1/2] detect-custom-ops")
    progress("[2/2] infer-shapes")
    progress.close()
    assert out.getvalue() == "qdqkit: [1/2] detect-custom-ops\nqdqkit: [2/2] infer-shapes\n"
    quiet = io.StringIO()
    Progress(quiet, enabled=False)("x")
    assert quiet.getvalue() == ""


def test_progress_redraws_a_status_line_on_terminals():
    out = io.StringIO()
    with Progress(out, live=True) as progress:
        progress("[1/1] simplify")
        time.sleep(1.2)
    text = out.getvalue()
    assert text.count("qdqkit: [1/1] simplify (") >= 1 and text.endswith("\r\x1b[K")


@pytest.mark.parametrize("echo", [True, False])
def test_library_warnings_reach_the_report_and_stderr_once(echo, capfd):
    """A library's ``logging.warning`` (the root logger: onnxruntime's quantizer does that) is counted for the
    report, shown once when not quiet, never by logging's last-resort printer; a logger with a handler of its own
    (ModelOpt's, outside qdqkit's calls) is counted and not shown twice; below WARNING nothing is kept."""
    import logging

    from qdqkit.report import LibraryWarnings

    own = logging.getLogger("qdqkit-test-own")
    handler = logging.StreamHandler(io.StringIO())
    own.addHandler(handler)
    stream = io.StringIO()
    try:
        with LibraryWarnings(echo=echo, stream=stream) as seen:
            logging.warning("bias is not constant")  # noqa: LOG015 - as a library does
            logging.warning("bias is not constant")  # noqa: LOG015
            own.warning("printed by its own handler")
            logging.getLogger("qdqkit-test-other").info("not kept")
    finally:
        own.removeHandler(handler)
    entries = {(e["logger"], e["message"]): e["count"] for e in seen.to_list()}
    assert entries == {("test_report", "bias is not constant"): 2, ("qdqkit-test-own", "printed by its own handler"): 1}
    assert stream.getvalue() == ("qdqkit: warning from test_report: bias is not constant\n" if echo else "")
    assert capfd.readouterr().err == ""  # not by logging's last resort either
    assert seen not in logging.getLogger().handlers
