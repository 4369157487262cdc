"""End to end at reduced sample count: both BEVFormer recipes through ``qdqkit apply`` with the ``bevformer:``
calibration source, on the real BEVFormer-tiny export, on the CPU.

Slow (about 3 minutes for both recipes on 2 shared cores: ModelOpt calibration and validation of a 6-camera
480x800 model); it is the CI check that the whole chain works. The demo (``python -m qdqkit.examples.bevformer
demo``) runs the same with more samples.
"""

import json

import numpy as np
import onnx
import pytest

from qdqkit.examples.bevformer import calib as C
from qdqkit.examples.bevformer import data as D
from qdqkit.examples.bevformer import export as E

# 2 calibration frames and 1 held-out frame; scenes of 3 frames so the held-out one continues a scene
# (use_prev_bev = 1: the temporal path is exercised).
SPEC = "bevformer:frames=3,seed=0,scene_len=3"
CALIB, VAL = 2, 1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported():
    return E.export(log=lambda _m: None)


@pytest.fixture(scope="module")
def source(exported):
    inputs = {i.name: (np.dtype(np.float32), tuple(d.dim_value for d in i.type.tensor_type.shape.dim))
              for i in onnx.load(str(exported.onnx_path), load_external_data=False).graph.input}
    return C.source_from_spec(SPEC, inputs)


def test_prev_bev_is_rolled_through_the_exported_model(exported, source):
    flags = [float(source.sample(i)["use_prev_bev"][0]) for i in range(3)]
    assert flags == [0.0, 1.0, 1.0]
    bev_fn = D.onnx_bev_fn(exported.onnx_path)
    bev0 = bev_fn(source.sample(0))
    np.testing.assert_allclose(source.sample(1)["prev_bev"], bev0, atol=1e-5)


@pytest.fixture(scope="module")
def results(exported, source, tmp_path_factory):
    from qdqkit.cli import main

    out = {}
    work = tmp_path_factory.mktemp("recipes")
    for recipe in ("bevformer-int8", "bevformer-int8-mha"):
        model = work / f"{recipe}.onnx"
        report = work / f"{recipe}.json"
        rc = main(["apply", str(exported.onnx_path), "-o", str(model), "--recipe", recipe, "--calib", SPEC,
                   "--calib-samples", str(CALIB), "--val-samples", str(VAL), "--report", str(report), "-q"])
        out[recipe] = (rc, model, json.loads(report.read_text()) if report.exists() else None)
    return out


def _pass_stats(rep, name):
    return next(p["stats"] for p in rep["passes"] if p["pass"] == name)


@pytest.mark.parametrize("recipe", ["bevformer-int8", "bevformer-int8-mha"])
def test_recipe_meets_fidelity_and_reports(results, recipe):
    rc, model, rep = results[recipe]
    assert rep is not None
    assert rc == 0, rep.get("failed")
    assert rep["custom_ops"]["known"] == ["MultiScaleDeformableAttnTRT2", "RotateTRT2"]
    val = _pass_stats(rep, "validate")
    assert val["passed"] and val["samples"] == {"start": CALIB, "count": VAL}
    cos = {o["name"]: o["cosine_min"] for o in val["outputs"]}
    assert set(cos) == {"bev_embed", "outputs_classes", "outputs_coords"}
    assert min(cos.values()) >= 0.99
    summary = _pass_stats(rep, "qdq")["summary"]
    assert summary["quantize_linear"] > 0 and summary["compute"]["Conv"]["int8"] == 55
    m = onnx.load(str(model), load_external_data=False)
    assert sum(n.op_type == "MultiScaleDeformableAttnTRT2" for n in m.graph.node) == 12


def test_structural_recipe_has_more_int8_and_no_less_fidelity(results, exported, source):
    _, m_orig, rep_orig = results["bevformer-int8"]
    _, m_mha, rep_mha = results["bevformer-int8-mha"]
    cov_orig = _pass_stats(rep_orig, "qdq")["summary"]["int8_coverage"]
    cov_mha = _pass_stats(rep_mha, "qdq")["summary"]["int8_coverage"]
    assert cov_mha > cov_orig + 0.02
    mm = _pass_stats(rep_mha, "qdq")["summary"]["compute"]["MatMul"]
    assert mm["int8"] == 30  # the encoder's projections: 3 layers x (TSA 4 + SCA 4 + FFN 2)
    excluded = _pass_stats(rep_mha, "qdq")["rules"]["by_rule"]
    assert len(excluded["pattern:mha"]) >= 6 * 3 and len(excluded["pattern:bevformer-geometry"]) == 1
    assert len(excluded["pattern:residual-add"]) == 16
    # Fidelity: every output of the structural recipe at least as close to FP32 as the original recipe's, up to
    # a margin for the single held-out frame of this reduced run (the demo's figures are in the README).
    val = {r: {o["name"]: o["cosine_min"] for o in _pass_stats(rep, "validate")["outputs"]}
           for r, rep in (("orig", rep_orig), ("mha", rep_mha))}
    for name in val["orig"]:
        assert val["mha"][name] >= val["orig"][name] - 5e-4, val
    # last decoder layer (what inference reads) on the held-out frame, both recipes against FP32
    from qdqkit.examples.bevformer.__main__ import last_layer_fidelity

    worst = {r: last_layer_fidelity(exported.onnx_path, m, source.folder, CALIB, VAL) for r, m in
             (("orig", m_orig), ("mha", m_mha))}
    for r in worst.values():
        assert min(r.values()) >= 0.99, worst


def test_fp16_recipe_keeps_the_camera_projection_fp32_and_validates(exported, tmp_path):
    """bevformer-fp16: the whole model FP16 except the nodes whose values FP16 cannot hold on these frames, which
    on BEVFormer-tiny are the camera projection's (pixel coordinates in the hundreds to thousands)."""
    from qdqkit.cli import main

    model, report = tmp_path / "fp16.onnx", tmp_path / "fp16.json"
    rc = main(["apply", str(exported.onnx_path), "-o", str(model), "--recipe", "bevformer-fp16", "--calib", SPEC,
               "--calib-samples", str(CALIB), "--val-samples", str(VAL), "--report", str(report), "-q"])
    rep = json.loads(report.read_text())
    assert rc == 0, rep.get("failed")
    stats = _pass_stats(rep, "fp16")
    kept = stats["fp32_nodes"]["range"]
    assert kept and all(n.startswith("/pts_bbox_head/transformer/encoder/") for n in kept), kept
    assert stats["fp32_nodes"]["rule"] == stats["fp32_nodes"]["plugin"] == []
    assert stats["tensors_by_precision"]["float16"] > 50 * stats["tensors_by_precision"]["float"]
    m = onnx.load(str(model), load_external_data=False)
    # each plugin as planned: its float inputs and outputs FP16 by its formats, or all FP32 where the node is kept,
    # read from the saved model's own types (not from the pass's check, which raises on any difference)
    from qdqkit.plugins import Session
    from qdqkit.precision import ONNX_PRECISION, tensor_types

    kept_all = {name for names in stats["fp32_nodes"].values() for name in names}
    types = tensor_types(m)
    nodes = list(Session.start().custom_ops.custom_nodes(m))
    assert nodes and {n.name for n, _ in nodes} == set(stats["plugin_check"])
    for node, spec in nodes:
        planned = {io: p for io, p in stats["plugin_precision"][node.op_type].items() if p in ("fp16", "fp32")}
        got = {io.name: ONNX_PRECISION.get(types.get(t), "?")
               for io, t in [*zip(spec.inputs, node.input), *zip(spec.outputs, node.output)]
               if t and io.name in planned}
        assert got == ({io: "fp32" for io in planned} if node.name in kept_all else planned), node.name
    val = _pass_stats(rep, "validate")
    assert val["passed"] and min(o["cosine_min"] for o in val["outputs"]) >= 0.99
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
