"""Exclusion rules and the built-in structural patterns, on the seeded transformer with MSDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qdqkit.errors import UserError
from qdqkit.patterns import graph_view, match_layernorm, match_mha
from qdqkit.rules import ExclusionRules, RuleRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
import qdq_models  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return qdq_models.transformer_msda()


@pytest.fixture(scope="module")
def registry():
    r = RuleRegistry()
    r.add_builtins()
    return r


def test_op_type_and_full_match_regex(model, registry):
    res = ExclusionRules.from_options(op_types=["Softmax"], nodes=["block0/attn/scores"]).resolve(model, registry)
    assert res.by_rule["op-type:Softmax"] == ["block0/attn/softmax", "block1/attn/softmax"]
    assert res.by_rule["node:block0/attn/scores"] == ["block0/attn/scores"]
    # full match: a prefix is not enough
    with pytest.raises(UserError, match="matches no node"):
        ExclusionRules.from_options(nodes=["block0/attn"]).resolve(model, registry)


def test_glob(model, registry):
    res = ExclusionRules.from_options(nodes_glob=["block?/msda/*_proj/MatMul"]).resolve(model, registry)
    assert len(res.by_rule["node-glob:block?/msda/*_proj/MatMul"]) == 8


def test_between_tensors(model, registry):
    res = ExclusionRules.from_options(between=[["block1/ln2/Add_1", "block1/msda/output_proj/Add"]]).resolve(
        model, registry)
    hit = set(res.excluded)
    assert "block1/msda/MultiScaleDeformableAttnTRT2" in hit and "block1/msda/output_proj/Add" in hit
    assert "block1/ln2/Add_1" not in hit          # the producer of the start tensor is outside
    assert "block1/residual2" not in hit          # past the end tensor
    with pytest.raises(UserError, match="tensor 'nope' is not consumed"):
        ExclusionRules.from_options(between=[["nope", "logits"]]).resolve(model, registry)


def test_mha_pattern_finds_structure_not_names(model, registry):
    renamed = type(model)()
    renamed.CopyFrom(model)
    for i, n in enumerate(renamed.graph.node):
        n.name = f"n{i}"
    by_name = {n.name: n.op_type for n in renamed.graph.node}
    hits = match_mha(graph_view(renamed))
    assert sorted(by_name[h] for h in hits) == ["MatMul"] * 4 + ["Mul"] * 2 + ["Softmax"] * 2
    # projections (MatMul by a weight) are not part of attention cores
    original = match_mha(graph_view(model))
    assert not any("proj" in h for h in original)


def test_layernorm_pattern_fused_and_decomposed(model):
    hits = match_layernorm(graph_view(model))
    assert {"block0/ln1/LayerNorm", "block0/ln2/LayerNorm"} <= hits
    decomposed = {h for h in hits if h.startswith("block1/ln1/")}
    assert len(decomposed) == 9  # ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add
    assert not any("msda" in h or "attn" in h for h in hits)


def test_no_match_is_an_error_unless_optional(model, registry):
    with pytest.raises(UserError) as e:
        ExclusionRules.from_options(op_types=["Matmul"]).resolve(model, registry)
    assert "did you mean MatMul" in str(e.value)
    res = ExclusionRules.from_options(op_types=["Gemm"], optional=["op-type:Gemm"]).resolve(model, registry)
    assert res.by_rule["op-type:Gemm"] == [] and res.excluded == []
    with pytest.raises(UserError, match="optional_rules names pattern:nope"):
        ExclusionRules.from_options(op_types=["Gemm"], optional=["pattern:nope"])


def test_unknown_pattern(model, registry):
    with pytest.raises(UserError, match="unknown exclusion pattern 'attention'; known patterns: layernorm, mha"):
        ExclusionRules.from_options(patterns=["attention"]).resolve(model, registry)


def test_plugin_pattern_and_toml_table(model):
    reg = RuleRegistry()
    reg.add_pattern("custom-ops", lambda g: {n for n, d in g.nodes(data=True) if d["op_type"].endswith("TRT2")},
                    "every TensorRT plugin node")
    rules = ExclusionRules.from_toml_table({"patterns": ["custom-ops"], "op_types": ["Conv"],
                                            "optional": ["Conv"]})
    res = rules.resolve(model, reg)
    assert len(res.by_rule["pattern:custom-ops"]) == 2 and len(res.by_rule["op-type:Conv"]) == 2
    with pytest.raises(UserError, match="unknown keys nodez"):
        ExclusionRules.from_toml_table({"nodez": ["x"]})


def test_report_lists_rule_to_nodes(model, registry):
    res = ExclusionRules.from_options(op_types=["Conv"], patterns=["mha"]).resolve(model, registry)
    d = res.to_dict()
    assert d["excluded_nodes"] == 2 + 8
    assert d["by_rule"]["op-type:Conv"] == ["stem/conv1", "stem/conv2"]


def test_mha_pattern_matches_eager_attention_spelling():
    """MatMul -> Div(scale) -> Add(mask) -> Softmax -> Cast -> Cast -> MatMul, as eager exporters write it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    T = TensorProto.FLOAT
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="t"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="a"),
             helper.make_node("Div", ["s", "scale"], ["s2"], name="b"),
             helper.make_node("Add", ["s2", "mask"], ["s3"], name="c"),
             helper.make_node("Softmax", ["s3"], ["p"], axis=-1, name="d"),
             helper.make_node("Cast", ["p"], ["p16"], to=TensorProto.FLOAT16, name="e"),
             helper.make_node("Cast", ["p16"], ["p32"], to=T, name="f"),
             helper.make_node("MatMul", ["p32", "v"], ["o"], name="g"),
             helper.make_node("MatMul", ["o", "w"], ["y"], name="proj")]
    inits = [numpy_helper.from_array(np.array(4.0, np.float32), "scale"),
             numpy_helper.from_array(np.zeros((1, 1, 8, 8), np.float32), "mask"),
             numpy_helper.from_array(np.zeros((16, 16), np.float32), "w")]
    ins = [helper.make_tensor_value_info(n, T, [1, 2, 8, 16]) for n in ("q", "k", "v")]
    g = helper.make_graph(nodes, "eager", ins, [helper.make_tensor_value_info("y", T, None)], inits)
    hits = match_mha(graph_view(helper.make_model(g)))
    assert hits == {"a", "b", "c", "d", "e", "f", "g"}
