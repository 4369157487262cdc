"""check: the ONNX checker with custom-op schemas, past 2 GB too."""

from __future__ import annotations

import onnx
import pytest
import toymodels

from qdqkit.errors import ValidationFailed
from qdqkit.model import ModelHandle
from qdqkit.pass_infra import PassContext


def _run(session, model, tmp_path, **options):
    ctx = PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=tmp_path)
    cls = session.passes.get("check")
    return cls(cls.make_options(options)).run(ModelHandle(model), ctx)


def test_custom_ops_pass_the_checker(toy_session, tmp_path):
    assert _run(toy_session, toymodels.plugin_model(), tmp_path).modified is False


def test_schema_violations_are_caught(toy_session, tmp_path):
    model = toymodels.plugin_model()
    scale = model.graph.node[3]
    scale.attribute.append(onnx.helper.make_attribute("bogus", 1))  # not an attribute of ToyScaleTRT
    with pytest.raises(ValidationFailed, match="bogus|Unrecognized attribute"):
        _run(toy_session, model, tmp_path)
    model = toymodels.plugin_model()
    model.graph.node[3].input.append("x")  # one input too many
    with pytest.raises(ValidationFailed):
        _run(toy_session, model, tmp_path)


def test_unknown_default_domain_op_fails(toy_session, tmp_path):
    model = toymodels.plugin_model()
    model.graph.node[3].op_type = "MysteryPluginTRT"
    with pytest.raises(ValidationFailed, match="MysteryPluginTRT"):
        _run(toy_session, model, tmp_path)


def test_large_model_checked_without_copying_weights(toy_session, tmp_path, monkeypatch):
    import qdqkit.model as qm

    monkeypatch.setattr(qm, "LIGHT_WEIGHTS", 1000)  # force the data-less path on a small model
    model = toymodels.big_model(total_bytes=2 * 256 * 256 * 4, width=256)
    assert _run(toy_session, model, tmp_path).modified is False
    model.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(ValidationFailed, match="missing_weight"):
        _run(toy_session, model, tmp_path)
