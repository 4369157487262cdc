"""Seeded weights for BEVFormer with activations of a realistic scale (no download).

Random initialisation alone gives a backbone whose activations drift in scale from layer to layer, which would make
calibration figures meaningless. So after a seeded initialisation in the spirit of the upstream one (Kaiming convs,
Xavier linears, the deformable-attention direction grid for sampling offsets, a focal-loss prior on the class bias),
the BatchNorm statistics are re-estimated on synthetic camera images (as AdaBN does, but per layer rather than per
channel, see :func:`recalibrate_batchnorm`), so every stage sees centred inputs of unit scale, as in a trained
network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import model as M


def _msda_offset_bias(heads: int, queue: int, points: int) -> torch.Tensor:
    """Upstream direction grid: head h looks along angle 2*pi*h/heads, point i sits (i+1) cells out."""
    theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(heads, 1, 1, 2).repeat(1, queue, points, 1)
    grid = grid * torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
    return grid.flatten()


def init_seeded(model: M.BEVFormer, seed: int = 0, calibrate_bn: bool = True, bn_images: int = 6) -> None:
    """Initialise every parameter from ``seed`` and, if asked, re-estimate BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)

    def normal_(t, std=1.0, mean=0.0):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    def uniform_(t, lo, hi):
        with torch.no_grad():
            t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            fan_out = mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
            normal_(mod.weight, std=math.sqrt(2.0 / fan_out))
            if mod.bias is not None:
                normal_(mod.bias, std=0.01)
        elif isinstance(mod, nn.BatchNorm2d):
            uniform_(mod.weight, 0.7, 1.3)
            normal_(mod.bias, std=0.1)
        elif isinstance(mod, nn.Linear):
            bound = math.sqrt(6.0 / (mod.in_features + mod.out_features))
            uniform_(mod.weight, -bound, bound)
            normal_(mod.bias, std=0.02)
        elif isinstance(mod, nn.LayerNorm):
            normal_(mod.weight, std=0.1, mean=1.0)
            normal_(mod.bias, std=0.05)
        elif isinstance(mod, nn.MultiheadAttention):
            bound = math.sqrt(6.0 / (mod.embed_dim * 2))
            uniform_(mod.in_proj_weight, -bound, bound)
            normal_(mod.in_proj_bias, std=0.02)
        elif isinstance(mod, nn.Embedding):
            normal_(mod.weight)

    # Residual branches start small, as mmdet's zero_init_residual start and trained ResNets have them; with
    # full-scale branches a random 16-block network is chaotic (a small input change grows block after block),
    # which no trained backbone is, and which would make every INT8 figure meaningless.
    for mod in model.img_backbone.modules():
        if isinstance(mod, M.Bottleneck):
            uniform_(mod.bn3.weight, 0.02, 0.15)

    cfg = model.cfg
    head = model.pts_bbox_head
    tr = head.transformer
    uniform_(head.positional_encoding.row_embed.weight, 0.0, 1.0)
    uniform_(head.positional_encoding.col_embed.weight, 0.0, 1.0)
    normal_(tr.level_embeds)
    normal_(tr.cams_embeds)

    # Offsets in pixels and weights as logits: a fixed direction grid plus a small input-dependent part, so the
    # plugin inputs vary with the scene as they do in a trained model.
    for mod in model.modules():
        if isinstance(mod, (M.TemporalSelfAttention, M.MSDeformableAttention3D, M.CustomMSDeformableAttention)):
            queue = getattr(mod, "num_bev_queue", 1)
            points = mod.sampling_offsets.out_features // (cfg.num_heads * queue * 2)
            normal_(mod.sampling_offsets.weight, std=0.05)
            with torch.no_grad():
                mod.sampling_offsets.bias.copy_(_msda_offset_bias(cfg.num_heads, queue, points))
            normal_(mod.attention_weights.weight, std=0.05)
            normal_(mod.attention_weights.bias, std=0.1)

    # The box-regression outputs keep PyTorch's default Linear scale, as upstream (no custom init there): these
    # outputs refine the reference points six times, and Xavier-sized steps would saturate them.
    for branch in head.reg_branches:
        last = branch[-1]
        bound = 1.0 / math.sqrt(last.in_features)
        uniform_(last.weight, -bound, bound)
        uniform_(last.bias, -bound, bound)

    prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: class probability 0.01 at start
    for branch in head.cls_branches:
        with torch.no_grad():
            branch[-1].bias.fill_(prior)

    if calibrate_bn:
        recalibrate_batchnorm(model, seed=seed, images=bn_images)


@torch.no_grad()
def recalibrate_batchnorm(model: M.BEVFormer, seed: int = 0, images: int = 6) -> None:
    """Set BN statistics from synthetic camera images, layer by layer in one forward pass.

    Each BN gets the per-channel mean of its input and, as variance, the mean of the per-channel variances:
    the layer's output is centred and of unit scale overall, while channels keep their relative scales. Full
    per-channel normalisation would blow up channels that carry almost no signal, amplifying any perturbation
    of them (quantization noise included) in a way a trained network, whose BN scales are learnt, does not.
    """
    from .data import SceneGenerator

    cfg = model.cfg
    gen = SceneGenerator(cfg, seed=seed + 1000)
    batch = torch.from_numpy(gen.frame_images(0, 0)).view(cfg.num_cams, 3, cfg.img_h, cfg.img_w)[:images]
    bns = [m for m in model.img_backbone.modules() if isinstance(m, nn.BatchNorm2d)]

    def estimating(bn):
        def forward(x):
            bn.running_mean.copy_(x.mean((0, 2, 3)))
            bn.running_var.fill_(float(x.var((0, 2, 3), unbiased=False).mean()))
            bn.num_batches_tracked.fill_(1)
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

        return forward

    for bn in bns:
        bn.forward = estimating(bn)  # instance attribute shadows the class method during this pass only
    try:
        model.img_backbone(batch)
    finally:
        for bn in bns:
            del bn.forward
    model.img_backbone.eval()
