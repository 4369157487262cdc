"""Seeded weights for BEVFormer with activations of a realistic scale (no download).

Random initialisation alone gives a backbone whose activations drift in scale from layer to layer, which would make
calibration figures meaningless. So after a seeded initialisation in the spirit of the upstream one (Kaiming convs,
Xavier linears, the deformable-attention direction grid for sampling offsets, a focal-loss prior on the class bias),
the BatchNorm running statistics are re-estimated on synthetic camera images, the way AdaBN does: every BN layer
then sees inputs of mean 0 and variance 1 at inference, as it would in a trained network.
"""

from __future__ import annotations

import math

import torch
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

    # Residual branches of a trained ResNet end in small BN scales; without that the stage outputs grow with depth.
    for mod in model.img_backbone.modules():
        if isinstance(mod, M.Bottleneck):
            uniform_(mod.bn3.weight, 0.1, 0.5)

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

    prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: class probability 0.01 at start
    for branch in head.cls_branches:
        with torch.no_grad():
            branch[-1].bias.fill_(prior)

    if calibrate_bn:
        recalibrate_batchnorm(model, seed=seed, images=bn_images)


@torch.no_grad()
def recalibrate_batchnorm(model: M.BEVFormer, seed: int = 0, images: int = 6) -> None:
    """Replace BN running statistics by cumulative averages over synthetic camera images."""
    from .data import SceneGenerator

    cfg = model.cfg
    gen = SceneGenerator(cfg, seed=seed + 1000)
    batch = torch.from_numpy(gen.frame_images(0, 0)).view(cfg.num_cams, 3, cfg.img_h, cfg.img_w)[:images]
    bns = [m for m in model.img_backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    model.img_backbone(batch)
    for m, (mom, training) in zip(bns, saved):
        m.momentum = mom
        m.train(training)
    model.img_backbone.eval()
