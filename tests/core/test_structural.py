"""The structural passes end to end on a generated plugin-laden model (the issue's acceptance case).

Standard ops plus custom ops in "" (ToyScaleTRT) and in "toy.ops" (ToyRowMeanTRT) go through
detect-custom-ops, trt-plugin-domain, simplify, infer-shapes and check, with the checker after every pass. The
result must pass the checker, have every tensor typed and shaped, carry the custom ops in trt.plugins, and run
in onnxruntime on the CPU with the registered kernels, giving the input model's outputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import toymodels

PASSES = "detect-custom-ops,trt-plugin-domain,simplify,infer-shapes,check"


@pytest.mark.parametrize("seed", [0, 7])
def test_structural_pipeline(qdqkit_cli, toy_session, tmp_path, seed):
    src = tmp_path / "plugin_model.onnx"
    model = toymodels.plugin_model(seed=seed, blocks=3)
    onnx.save(model, src)
    original = src.read_bytes()
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    rc, _, err = qdqkit_cli("apply", src, "-o", out, "--passes", PASSES, "--verify-each", "--report", report, "-q")
    assert rc == 0, err
    assert src.read_bytes() == original

    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    typed = {v.name: v.type.tensor_type for v in (*result.graph.value_info, *result.graph.output)}
    for node in result.graph.node:
        for name in node.output:
            tt = typed[name]
            assert tt.elem_type != 0, name
            assert tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim), name
    custom = [(n.domain, n.op_type) for n in result.graph.node if n.op_type.startswith("Toy")]
    assert sorted(custom) == [("trt.plugins", "ToyRowMeanTRT")] + [("trt.plugins", "ToyScaleTRT")] * 3
    assert {o.domain: o.version for o in result.opset_import}["trt.plugins"] == 1
    assert len(result.functions) == 0  # execution functions never reach the written model

    with pytest.raises(Exception):  # the model really needs the kernels
        ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for _ in range(3):
        x = rng.standard_normal((1, 8, 16)).astype(np.float32)
        want = toy_session.custom_ops.session(model).run(None, {"x": x})[0]
        got = toy_session.custom_ops.session(str(out)).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    data = json.loads(report.read_text())
    assert [p["pass"] for p in data["passes"]] == PASSES.split(",")
    assert {"custom-ops-known", "trt-domain", "simplified", "shapes"} <= set(data["facts"])
