"""Fixtures of the pass tests that run the seeded plugin-laden transformer (``qdq_models``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def session():
    """A qdqkit Session with every installed plugin (BEVFormer's ops among them) and their schemas registered."""
    from qdqkit.plugins import Session

    s = Session.start()
    s.custom_ops.register_onnx_schemas()
    return s
