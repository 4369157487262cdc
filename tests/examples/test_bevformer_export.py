"""The exported BEVFormer-tiny graph: interface, custom-op inventory, shapes after infer-shapes, onnxruntime
against PyTorch, the export cache, and the plugin's recipes and pattern on the real graph.

The export (about 30 s) is cached on disk by ``qdqkit.examples.bevformer.export``; the fixtures here share it
within the session.
"""

import collections
import time

import numpy as np
import onnx
import pytest
import torch

from qdqkit.examples.bevformer import data as D
from qdqkit.examples.bevformer import export as E
from qdqkit.validation import cosine

# Measured on this machine (onnxruntime CPU with the registered ONNX-function kernels vs PyTorch FP32, one frame
# with use_prev_bev=1): bev_embed 9.8e-6, outputs_classes 1.2e-3, outputs_coords 1.4e-2 (coords reach ~50 m).
# The decoder amplifies float reordering through six rounds of reference-point refinement, hence the looser
# bounds on the head outputs.
MAX_ABS = {"bev_embed": 1e-3, "outputs_classes": 2e-2, "outputs_coords": 2e-1}


@pytest.fixture(scope="session")
def exported():
    return E.export(log=lambda _m: None)


@pytest.fixture(scope="session")
def onnx_model(exported):
    return onnx.load(str(exported.onnx_path))


def _dims(vi):
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_interface_matches_upstream(onnx_model):
    m = onnx_model
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 13
    inits = {t.name for t in m.graph.initializer}
    inputs = [(i.name, _dims(i), i.type.tensor_type.elem_type) for i in m.graph.input if i.name not in inits]
    f = onnx.TensorProto.FLOAT
    assert inputs == [
        ("image", [1, 6, 3, 480, 800], f),
        ("prev_bev", [2500, 1, 256], f),
        ("use_prev_bev", [1], f),
        ("can_bus", [18], f),
        ("lidar2img", [1, 6, 4, 4], f),
    ]
    assert len(m.graph.input) == 5  # keep_initializers_as_inputs=False
    outputs = [(o.name, _dims(o), o.type.tensor_type.elem_type) for o in m.graph.output]
    assert outputs == [
        ("bev_embed", [2500, 1, 256], f),
        ("outputs_classes", [6, 1, 900, 10], f),
        ("outputs_coords", [6, 1, 900, 10], f),
    ]


def test_custom_op_inventory(onnx_model):
    custom = [n for n in onnx_model.graph.node if n.op_type.endswith(("TRT", "TRT2"))]
    counts = collections.Counter((n.domain, n.op_type) for n in custom)
    assert counts == {("", "MultiScaleDeformableAttnTRT2"): 12, ("", "RotateTRT2"): 1}
    rot = next(n for n in custom if n.op_type == "RotateTRT2")
    assert [(a.name, a.type, a.i) for a in rot.attribute] == [("interpolation", onnx.AttributeProto.INT, 1)]
    consts = {n.output[0]: n for n in onnx_model.graph.node if n.op_type == "Constant"}
    inits = {t.name: t for t in onnx_model.graph.initializer}
    shapes = collections.Counter()
    for n in custom:
        if n.op_type.startswith("MultiScale"):
            assert len(n.input) == 5 and not n.attribute
            src = consts[n.input[1]].attribute[0].t if n.input[1] in consts else inits[n.input[1]]
            assert src.data_type == onnx.TensorProto.INT64
            shapes[tuple(onnx.numpy_helper.to_array(src).ravel())] += 1
    assert shapes == {(50, 50): 9, (15, 25): 3}  # TSA x3 + decoder x6, SCA x3
    # the graph's compute inventory as the reference counts it (Conv incl. FPN, MatMul, Gemm, Softmax)
    ops = collections.Counter(n.op_type for n in onnx_model.graph.node)
    assert (ops["Conv"], ops["MatMul"], ops["Gemm"], ops["Softmax"]) == (55, 152, 8, 6)


@pytest.mark.slow  # a second full export (about 30 s) on a fresh cache
def test_cp_variant_names():
    res = E.export(variant=1, log=lambda _m: None)
    m = onnx.load(str(res.onnx_path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in m.graph.node if "TRT" in n.op_type)
    assert counts == {"MultiScaleDeformableAttnTRT": 12, "RotateTRT": 1}
    assert res.onnx_path.name == "bevformer_tiny_cp_op13.onnx"


def test_second_export_is_cached(exported):
    t0 = time.perf_counter()
    again = E.export(log=lambda _m: None)
    assert again.cached and again.onnx_path == exported.onnx_path
    assert time.perf_counter() - t0 < 5


def test_every_tensor_typed_and_shaped_after_infer_shapes(exported, tmp_path, monkeypatch, capsys):
    from qdqkit.cli import main

    out = tmp_path / "shaped.onnx"
    rc = main(["apply", str(exported.onnx_path), "-o", str(out), "-q",
               "--passes", "detect-custom-ops,trt-plugin-domain,infer-shapes"])
    assert rc == 0, capsys.readouterr().err
    m = onnx.load(str(out), load_external_data=False)
    known = {v.name: v for v in (*m.graph.value_info, *m.graph.output, *m.graph.input)}
    gaps = []
    for node in m.graph.node:
        for name in node.output:
            v = known.get(name)
            if v is None or v.type.tensor_type.elem_type == 0 or not v.type.tensor_type.HasField("shape") or any(
                not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim
            ):
                gaps.append(name)
    assert gaps == []
    assert {n.domain for n in m.graph.node if "TRT" in n.op_type} == {"trt.plugins"}


def test_onnxruntime_reproduces_pytorch(exported):
    gen = D.SceneGenerator(seed=5, scene_len=4)
    sample = gen.inputs(2)  # mid-scene: the temporal path is live
    sample["prev_bev"] = np.random.default_rng(1).standard_normal((2500, 1, 256)).astype(np.float32)
    from qdqkit.plugins import Session

    session = Session.start().custom_ops.session(onnx.load(str(exported.onnx_path)))
    got = session.run(None, sample)
    model = exported.load_model()
    with torch.no_grad():
        ref = [t.numpy() for t in model(*[torch.from_numpy(sample[k]) for k in D.INPUT_NAMES])]
    for name, g, r in zip(E.BEVFormer.output_names, got, ref):
        err = float(np.abs(g - r).max())
        cos = cosine(g, r)
        assert err < MAX_ABS[name], (name, err)
        assert cos > 0.99999, (name, cos)
    assert sample["use_prev_bev"][0] == 1


def test_recipes_and_patterns_on_the_graph(onnx_model):
    from qdqkit.patterns import graph_view, match_mha
    from qdqkit.plugins import Session

    from qdqkit.examples.bevformer.plugin import match_deformable_offsets, match_geometry, match_temporal_state

    session = Session.start()
    steps = {name: [s.pass_name for s in session.recipes.get(name).steps]
             for name in ("bevformer-int8", "bevformer-int8-mha")}
    expected = ["detect-custom-ops", "trt-plugin-domain", "infer-shapes", "qdq", "simplify", "validate"]
    assert steps == {"bevformer-int8": expected, "bevformer-int8-mha": expected}
    original = session.recipes.get("bevformer-int8").steps[3].options
    assert original["exclude_op_types"] == ["MatMul"]
    g = graph_view(onnx_model)
    geo = match_geometry(g)
    assert len(geo) == 1 and g.nodes[next(iter(geo))]["op_type"] == "MatMul"
    offsets = match_deformable_offsets(g)
    assert len(offsets) == 12 and all(n.endswith("sampling_offsets/MatMul") for n in offsets)
    state = match_temporal_state(g)
    ops = collections.Counter(g.nodes[n]["op_type"] for n in state)
    assert not set(ops) & {"MatMul", "Gemm", "Conv"} and ops["Add"] == 3  # the queue gate of the 3 TSA layers
    assert all("/encoder/" in n or n.startswith("/pts_bbox_head/transformer/") for n in state)
    mha = match_mha(g)
    kinds = collections.Counter(g.nodes[n]["op_type"] for n in mha)
    assert kinds["Softmax"] == 6 and kinds["MatMul"] == 12  # Q.K^T and .V of the 6 decoder self-attentions
