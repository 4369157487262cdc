"""BEVFormer-tiny structure: parameter count, upstream checkpoint naming, checkpoint loading errors."""

import subprocess
import sys

import pytest
import torch

from qdqkit.errors import UserError
from qdqkit.examples.bevformer import checkpoint as C
from qdqkit.examples.bevformer import model as M

from bevformer_upstream_keys import upstream_tiny_keys


@pytest.fixture(scope="module")
def bare_model():
    return M.BEVFormer(M.TINY)


def test_parameter_count_matches_reference(bare_model):
    assert M.count_parameters(bare_model) == 33_521_157


def test_state_dict_keys_and_shapes_match_upstream(bare_model):
    ours = {k: tuple(v.shape) for k, v in bare_model.state_dict().items()}
    upstream = upstream_tiny_keys()
    assert sorted(set(upstream) - set(ours)) == []
    assert sorted(set(ours) - set(upstream)) == []
    mismatched = {k: (ours[k], upstream[k]) for k in upstream if ours[k] != upstream[k]}
    assert mismatched == {}


def test_upstream_checkpoint_loads(tmp_path, bare_model):
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(s, generator=gen) if s else torch.tensor(7) for k, s in upstream_tiny_keys().items()}
    state["extra_unused"] = torch.zeros(1)
    path = tmp_path / "bevformer_tiny_epoch_24.pth"
    torch.save({"meta": {"epoch": 24}, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    model = M.BEVFormer(M.TINY)
    unused = C.load_upstream_checkpoint(model, path)
    assert unused == ["extra_unused"]
    key = "pts_bbox_head.transformer.encoder.layers.2.attentions.1.deformable_attention.sampling_offsets.weight"
    assert torch.equal(model.state_dict()[key], state[key])
    assert torch.equal(model.img_backbone.layer4[2].bn3.running_var, state["img_backbone.layer4.2.bn3.running_var"])


def test_checkpoint_errors_are_user_errors(tmp_path, bare_model):
    with pytest.raises(UserError, match="not found"):
        C.load_upstream_checkpoint(bare_model, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        C.load_upstream_checkpoint(bare_model, bad)
    keys = upstream_tiny_keys()
    wrong = {k: torch.zeros(s) for k, s in keys.items()}
    wrong["pts_bbox_head.bev_embedding.weight"] = torch.zeros(40000, 256)  # a base-size checkpoint
    torch.save({"state_dict": wrong}, tmp_path / "base.pth")
    with pytest.raises(UserError, match="shape"):
        C.load_upstream_checkpoint(bare_model, tmp_path / "base.pth")
    partial = {k: torch.zeros(s) for k, s in list(keys.items())[:10]}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="lacks"):
        C.load_upstream_checkpoint(bare_model, tmp_path / "partial.pth")
