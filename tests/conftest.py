"""Shared test set-up: the toy custom-op plugin and model generators of tests/core are importable everywhere,
and ``qdqkit_cli`` runs the command line in-process on a chosen plugin set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

CORE_TESTS = Path(__file__).parent / "core"
if str(CORE_TESTS) not in sys.path:
    sys.path.insert(0, str(CORE_TESTS))

# the plugins core tests run with: the built-in passes and the toy ops, nothing else installed
TOY_PLUGINS = ("-p", "builtin-passes", "-p", "qdqkit_toyops")


@pytest.fixture
def toy_session(monkeypatch):
    """A qdqkit Session with only the built-in passes and the toy custom ops (entry-point autoload off)."""
    from qdqkit.plugins import Session

    monkeypatch.setenv("QDQKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    session = Session.start(["builtin-passes", "qdqkit_toyops"])
    session.custom_ops.register_onnx_schemas()
    return session


@pytest.fixture
def qdqkit_cli(monkeypatch, capsys):
    """Run ``qdqkit ARGS`` in-process with autoload off and the toy plugins; returns (rc, stdout, stderr)."""
    from qdqkit.cli import main

    monkeypatch.setenv("QDQKIT_DISABLE_PLUGIN_AUTOLOAD", "1")

    def run(*args: str, plugins: tuple[str, ...] = TOY_PLUGINS) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([*plugins, *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out, err

    return run
