"""Pipelines: step lists from names and TOML, requirement checks, instrumentation, verify-each, dumps."""

from __future__ import annotations

import onnx
import pytest
import toymodels

from qdqkit.errors import UserError, ValidationFailed
from qdqkit.model import ModelHandle
from qdqkit.pass_infra import Pass, PassContext, PassResult
from qdqkit.pipeline import Pipeline, Recipe, RecipeRegistry, Step, select_steps, steps_from_names, steps_from_toml
from qdqkit.report import Instrumentation


def _ctx(session, tmp_path):
    return PassContext(custom_ops=session.custom_ops, hook=session.hook, workdir=tmp_path,
                       registries=session.registries)


def _handle(tmp_path, **kw):
    path = tmp_path / "in.onnx"
    onnx.save(toymodels.plugin_model(**kw), path)
    return ModelHandle.load(path)


def test_steps_from_names_and_toml(tmp_path):
    assert [s.pass_name for s in steps_from_names("a, b,c")] == ["a", "b", "c"]
    with pytest.raises(UserError, match="comma-separated"):
        steps_from_names("a,,b")
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nname = "detect-custom-ops"\n\n[[pass]]\nname = "qdq"\nexclude_op_types = ["MatMul"]\n')
    steps = steps_from_toml(cfg)
    assert steps == [Step("detect-custom-ops", {}), Step("qdq", {"exclude_op_types": ["MatMul"]})]
    cfg.write_text("[[pass]]\nname = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        steps_from_toml(cfg)
    cfg.write_text("[[pass]]\nfoo = 1\n")
    with pytest.raises(UserError, match="has no name"):
        steps_from_toml(cfg)
    with pytest.raises(UserError, match="not found"):
        steps_from_toml(tmp_path / "missing.toml")


def test_recipe_registry_and_conditional_steps():
    reg = RecipeRegistry()
    reg.add(Recipe("r", "d", [Step("a"), Step("q", when="calib")]))
    with pytest.raises(UserError, match="unknown recipe 'x'; known recipes: r"):
        reg.get("x")
    assert [s.pass_name for s in select_steps(reg.get("r").steps, calib=False)] == ["a"]
    assert [s.pass_name for s in select_steps(reg.get("r").steps, calib=True)] == ["a", "q"]


def test_missing_requirement_names_the_providing_pass(toy_session):
    with pytest.raises(UserError, match=r"pass 'infer-shapes' \(step 2\) requires 'custom-ops-known'.*"
                                        r"add 'detect-custom-ops' before it"):
        Pipeline(steps_from_names("check,infer-shapes"), toy_session.passes)
    with pytest.raises(UserError, match="unknown pass 'nope'"):
        Pipeline(steps_from_names("nope"), toy_session.passes)
    with pytest.raises(UserError, match="has no option 'bogus'"):
        Pipeline([Step("check", {"bogus": 1})], toy_session.passes)


def test_run_instruments_each_pass_and_dumps_changes(toy_session, tmp_path):
    handle = _handle(tmp_path)
    toy_session.pm.register(Instrumentation(), name="qdqkit-instrumentation")
    dumps = tmp_path / "dumps"
    pipe = Pipeline(steps_from_names("detect-custom-ops,trt-plugin-domain,infer-shapes,check"), toy_session.passes,
                    hook=toy_session.hook, verify_each=True, dump_dir=dumps)
    ctx = _ctx(toy_session, tmp_path)
    records = pipe.run(handle, ctx)
    assert [r.modified for r in records] == [False, True, True, False]
    for r in records:
        assert r.figures["wall_s"] >= 0 and r.figures["peak_rss_mb"] > 0
        assert r.figures["nodes_before"] == r.figures["nodes_after"] == handle.node_count()
    assert records[1].figures["op_count_diff"] == {"ToyScaleTRT": -2, "toy.ops::ToyRowMeanTRT": -1,
                                                  "trt.plugins::ToyScaleTRT": 2, "trt.plugins::ToyRowMeanTRT": 1}
    assert sorted(p.name for p in dumps.iterdir()) == ["02-trt-plugin-domain.onnx", "03-infer-shapes.onnx"]
    assert {"custom-ops-known", "trt-domain", "shapes"} <= ctx.facts
    assert handle.conversions == 0


class _BreakingPass(Pass):
    """Adds a node with a dangling input: a checker failure right after this pass."""

    name = "break-graph"

    def run(self, model, ctx):
        model.proto.graph.node.append(onnx.helper.make_node("Relu", ["does_not_exist"], ["z"]))
        return PassResult(True)


def test_verify_each_names_the_pass_that_broke_the_model(toy_session, tmp_path):
    toy_session.passes.add(_BreakingPass)
    pipe = Pipeline(steps_from_names("detect-custom-ops,break-graph"), toy_session.passes, verify_each=True)
    with pytest.raises(ValidationFailed, match="after pass 'break-graph'"):
        pipe.run(_handle(tmp_path), _ctx(toy_session, tmp_path))
