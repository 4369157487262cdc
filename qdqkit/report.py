"""The run report (JSON for machines, a short table for people) and the built-in pass instrumentation.

Instrumentation is an ordinary plugin object implementing ``qdqkit_before_pass`` / ``qdqkit_after_pass``: it
measures each pass's wall time, peak resident memory and node / op-count changes and leaves the figures where
the pipeline files them with the step's record.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from qdqkit.hookspecs import hookimpl

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident memory of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def peak_rss() -> int:
    """Peak resident memory (VmHWM) in bytes since start or since the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark so the next ``peak_rss`` covers only what follows (Linux); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Instrumentation:
    """Measures each pass through the before/after-pass hooks (registered by the CLI as plugin
    ``qdqkit-instrumentation``).

    Per-pass peaks come from resetting the kernel's peak-RSS mark before each pass. Linux derives a process's
    final maximum RSS (what ``/usr/bin/time`` prints) from that same mark, so after an instrumented run such
    tools see only the peak since the last pass began: read the report's per-pass figures instead.
    """

    def __init__(self) -> None:
        self._start: dict[int, tuple[float, int, int, dict[str, int]]] = {}
        self.can_reset_peak = True

    @hookimpl
    def qdqkit_before_pass(self, pass_: Any, model: Any, ctx: Any) -> None:
        index = ctx.state.get("_step_index", 0)
        self.can_reset_peak = reset_peak_rss()
        self._start[index] = (time.perf_counter(), current_rss(), model.node_count(), model.op_histogram())

    @hookimpl
    def qdqkit_after_pass(self, pass_: Any, model: Any, ctx: Any, result: Any) -> None:
        index = ctx.state.get("_step_index", 0)
        if index not in self._start:
            return
        start, rss0, nodes0, hist0 = self._start.pop(index)
        figures = ctx.state.get("_instrumentation", {}).get(index)
        if figures is None:
            return
        hist1 = model.op_histogram()
        diff = {op: hist1.get(op, 0) - hist0.get(op, 0) for op in set(hist0) | set(hist1)}
        figures.update({
            "wall_s": round(time.perf_counter() - start, 4),
            "peak_rss_mb": round(peak_rss() / 2**20, 1),
            "peak_is_per_pass": self.can_reset_peak,
            "rss_delta_mb": round((current_rss() - rss0) / 2**20, 1),
            "nodes_before": nodes0,
            "nodes_after": model.node_count(),
            "op_count_diff": {op: d for op, d in sorted(diff.items()) if d},
        })


class LibraryWarnings(logging.Handler):
    """Warnings that the libraries a run calls log through Python's logging (onnxruntime's quantizer logs through
    the root logger, for one), for the report: each message once with its count. Shown on ``stream`` as they come
    (each message once) when ``echo`` is set and no logger of their own printed them already; with ``echo`` off
    (a quiet run) they only reach the report. Installed on the root logger for the ``with`` block, which also keeps
    logging's last-resort printer from writing them."""

    def __init__(self, echo: bool, stream: TextIO | None = None) -> None:
        super().__init__(logging.WARNING)
        self.echo, self.stream = echo, stream or sys.stderr
        self.seen: dict[tuple[str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = (_source(record), record.getMessage())
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.echo and self.seen[key] == 1 and not _shown_by_own_handler(record.name):
            self.stream.write(f"qdqkit: warning from {key[0]}: {key[1]}\n")
            self.stream.flush()

    def to_list(self) -> list[dict[str, Any]]:
        return [{"logger": name, "message": msg, "count": n} for (name, msg), n in self.seen.items()]

    def __enter__(self) -> LibraryWarnings:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


def _source(record: logging.LogRecord) -> str:
    """The logger's name, or for the root logger the package that logged (``logging.warning`` in a library)."""
    if record.name != "root":
        return record.name
    parts = Path(record.pathname).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return record.module


def _shown_by_own_handler(name: str) -> bool:
    """Whether a record of logger ``name`` met a handler before reaching the root logger (a library's own, that
    printed it already; ModelOpt's is kept off while qdqkit calls it, modelopt_compat's patch 10)."""
    log: logging.Logger | None = logging.getLogger(name)
    root = logging.getLogger()
    while log is not None and log is not root:
        if log.handlers:
            return True
        if not log.propagate:
            return False
        log = log.parent  # type: ignore[assignment]
    return False


class Report:
    """Everything a run produced, for ``--report out.json`` and the summary table."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"qdqkit_report": 1}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.data, default=_jsonable))

    def write(self, path: str | os.PathLike) -> None:
        """Write the JSON report atomically."""
        path = Path(path)
        text = json.dumps(self.data, indent=2, sort_keys=False, default=_jsonable) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def table(self) -> str:
        """A short human summary: one line per pass."""
        lines = []
        steps = self.data.get("passes", [])
        if steps:
            width = max(len(s["pass"]) for s in steps)
            lines.append(f"{'pass':<{width}}  {'changed':<7}  {'time s':>8}  {'peak MB':>8}  nodes")
            for s in steps:
                nodes = f"{s.get('nodes_before', '?')} -> {s.get('nodes_after', '?')}"
                lines.append(f"{s['pass']:<{width}}  {('yes' if s['modified'] else 'no'):<7}  "
                             f"{s.get('wall_s', s.get('seconds', 0)):>8.3f}  {s.get('peak_rss_mb', 0):>8.1f}  {nodes}")
                if s.get("stats", {}).get("skipped"):
                    lines.append(f"{'':<{width}}  skipped: {s['stats']['skipped']}")
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)
