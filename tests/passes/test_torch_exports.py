"""qdqkit on transformers exported by PyTorch itself, not built by hand: a small ViT (patch convolution,
``nn.TransformerEncoder`` with pre-norm layers) through both of torch's exporters, the TorchScript one at opset 17
(attention decomposed into MatMul / Softmax) and the dynamo one at opset 23 (attention as the ONNX ``Attention``
op). The built-in patterns must find every attention core and LayerNorm, and the original recipe's rule and the
``mha`` pattern must each give an INT8 model that ModelOpt calibrates, onnxruntime runs and ``validate`` passes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qdqkit.calib import file_name_for
from qdqkit.cli import main
from qdqkit.patterns import graph_view, match_layernorm, match_mha

torch = pytest.importorskip("torch")

DEPTH = 3
EXPORTS = {"torchscript-17": (False, 17), "dynamo-23": (True, 23)}


def _vit():
    nn = torch.nn

    class ViT(nn.Module):
        def __init__(self, dim: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 8, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.enc = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
            return self.head(self.enc(t)[:, 0])

    torch.manual_seed(0)
    return ViT().eval()


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, tmp_path_factory):
    """(model path, calibration folder, whether the export is dynamo's) of one export."""
    dynamo, opset = EXPORTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / "vit.onnx"
    torch.onnx.export(_vit(), (torch.randn(1, 3, 32, 32),), str(path), opset_version=opset, dynamo=dynamo)
    model = onnx.load(path)
    (name,) = [i.name for i in model.graph.input]
    calib = folder / "calib"
    calib.mkdir()
    np.save(calib / file_name_for(name), np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32))
    return path, calib, dynamo


def test_patterns_find_every_attention_core_and_layernorm(exported):
    model = onnx.load(exported[0])
    g = graph_view(model)
    mha, ln = match_mha(g), match_layernorm(g)
    ops = [g.nodes[n]["op_type"] for n in mha]
    # dynamo's export gives the Attention op (what the Attention path needs covered), TorchScript's decomposes it
    assert any(n.op_type == "Attention" for n in model.graph.node) == exported[2]
    if exported[2]:
        assert ops.count("Attention") == DEPTH and "MatMul" not in ops
    else:
        assert ops.count("Softmax") == DEPTH and ops.count("MatMul") == 2 * DEPTH
    assert len(ln) == 2 * DEPTH  # two a pre-norm layer (the encoder has no final norm)


@pytest.mark.parametrize("rule", [("--exclude-op-types", "MatMul"), ("--exclude-pattern", "mha"),
                                  ("--exclude-pattern", "mha", "--high-precision", "fp16")])
def test_int8_with_the_recipes_rules_validates(exported, rule, tmp_path, capfd):
    """Each rule (and FP16 outside INT8) validates; a quiet run prints nothing (onnxruntime's quantizer warns of
    the TorchScript export's computed Gemm biases through the root logger: those go to the report only)."""
    path, calib, dynamo = exported
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    capfd.readouterr()
    assert main(["apply", str(path), "-o", str(out), "--passes", "qdq,validate", "--calib", str(calib),
                 "--calib-samples", "16", "--val-samples", "8", "--report", str(rep), "-q", *rule]) == 0
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""
    report = json.loads(rep.read_text())
    val = next(p for p in report["passes"] if p["pass"] == "validate")["stats"]
    assert val["passed"] and all(o["cosine_min"] >= 0.99 for o in val["outputs"])
    q = onnx.load(out)
    made_by = {t: n.op_type for n in q.graph.node for t in n.output}
    g = graph_view(q)
    fed = {n.name for n in q.graph.node if any(made_by.get(t) == "DequantizeLinear" for t in n.input)}
    cores = {n for n in match_mha(g) if g.nodes[n]["op_type"] in ("MatMul", "Attention")}
    assert ("Attention" in {g.nodes[n]["op_type"] for n in cores}) == dynamo
    assert len(cores) == DEPTH * (1 if dynamo else 2)
    projections = {n.name for n in q.graph.node if n.op_type in ("MatMul", "Gemm")} - cores
    if rule[1] == "mha":
        assert not cores & fed, "an attention core was quantized"
        assert projections & fed, "no projection was quantized"
    else:
        assert not {n.name for n in q.graph.node if n.op_type == "MatMul"} & fed
    assert "Conv" in {n.op_type for n in q.graph.node if n.name in fed}


def test_fp16_typing_validates(exported, tmp_path):
    """The fp16 pass on the same exports: every computed float tensor FP16 (nothing here is past data_max), and the
    FP16 model validates against the float one."""
    path, calib, _ = exported
    out, rep = tmp_path / "h.onnx", tmp_path / "r.json"
    assert main(["apply", str(path), "-o", str(out), "--passes", "fp16,validate", "--calib", str(calib),
                 "--calib-samples", "8", "--val-samples", "8", "--report", str(rep), "-q"]) == 0
    report = json.loads(rep.read_text())
    stats = next(p for p in report["passes"] if p["pass"] == "fp16")["stats"]
    assert not any(stats["fp32_nodes"].values()) and "float" not in stats["tensors_by_precision"]
    assert stats["tensors_by_precision"]["float16"] > 0
    val = next(p for p in report["passes"] if p["pass"] == "validate")["stats"]
    assert val["passed"] and all(o["cosine_min"] >= 0.999 for o in val["outputs"])
