"""BEVFormer-tiny in plain PyTorch, shaped like the TensorRT-plugin export ("p2" / "cp2_op13").

The dataflow follows the upstream TensorRT port (DerryHub/BEVFormer_tensorrt, ``forward_trt``): the temporal path is
gated arithmetically by ``use_prev_bev``, the spatial cross-attention computes every camera-query pair and masks it,
and the softmax of the deformable attention lives inside the ``MultiScaleDeformableAttnTRT2`` op. Module names
mirror the upstream checkpoint (mmdet ResNet/FPN, mmcv transformer layers, ``pts_bbox_head``) so that an upstream
``state_dict`` loads without renaming; see :mod:`qdqkit.examples.bevformer.checkpoint`.

The custom ops come from :mod:`qdqkit.custom_ops.torch_ops`; they run in plain PyTorch on the CPU and export as
single nodes in the default ONNX domain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BEVFormerConfig", "BEVFormer", "TINY", "build_model", "count_parameters"]


@dataclass(frozen=True)
class BEVFormerConfig:
    """Every number that determines the graph. ``TINY`` is the upstream ``bevformer_tiny`` configuration."""

    name: str = "tiny"
    num_cams: int = 6
    img_h: int = 480  # padded height; the network normalises image coordinates by it
    img_w: int = 800
    depth: int = 50
    embed_dims: int = 256
    pos_dims: int = 128
    ffn_dims: int = 512
    num_heads: int = 8
    bev_h: int = 50
    bev_w: int = 50
    enc_layers: int = 3
    dec_layers: int = 6
    num_points_in_pillar: int = 4
    tsa_points: int = 4
    sca_points: int = 8
    dec_points: int = 4
    num_feature_levels: int = 4  # level_embeds rows; only row 0 is used (one FPN level)
    num_query: int = 900
    num_classes: int = 10
    code_size: int = 10
    pc_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    rotate_center: tuple[float, float] = (100.0, 100.0)  # upstream default, outside the 50x50 map; kept on purpose

    @property
    def feat_hw(self) -> tuple[int, int]:
        """Spatial size of the single FPN level (stride 32)."""
        return (self.img_h + 31) // 32, (self.img_w + 31) // 32

    def as_dict(self) -> dict:
        """Plain-dict form, used as the export cache key."""
        return asdict(self)


TINY = BEVFormerConfig()


# ----------------------------------------------------------------------------------------------------------------
# Backbone and neck (mmdet ResNet-50 'pytorch' style, FPN with one input level)
# ----------------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet bottleneck with the stride on the 3x3 conv (mmdet ``style='pytorch'``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-50 returning only the last stage (``out_indices=(3,)``)."""

    arch = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

    def __init__(self, depth: int = 50):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, blocks in enumerate(self.arch[depth]):
            planes = 64 * 2**i
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.out_channels = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ConvModule(nn.Module):
    """Holds a conv under the attribute ``conv`` so checkpoint keys read ``lateral_convs.0.conv.weight``."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """mmdet FPN with one input level and ``num_outs=1``: a 1x1 lateral conv then a 3x3 output conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList([ConvModule(in_channels, out_channels, 1)])
        self.fpn_convs = nn.ModuleList([ConvModule(out_channels, out_channels, 3, padding=1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fpn_convs[0](self.lateral_convs[0](x))


# ----------------------------------------------------------------------------------------------------------------
# Attention modules
# ----------------------------------------------------------------------------------------------------------------


def _msda(value, spatial_shapes, reference_points, sampling_offsets, attention_weights, variant):
    from qdqkit.custom_ops import torch_ops

    return torch_ops.ms_deform_attn(
        value, spatial_shapes, reference_points, sampling_offsets, attention_weights, variant=variant
    )


def _spatial_shapes(h: int, w: int) -> torch.Tensor:
    return torch.tensor([[h, w]], dtype=torch.int64)


class TemporalSelfAttention(nn.Module):
    """Deformable self-attention over the [previous BEV, current BEV] queue (upstream TemporalSelfAttentionTRTP2)."""

    def __init__(self, cfg: BEVFormerConfig, num_bev_queue: int = 2):
        super().__init__()
        e, m, p = cfg.embed_dims, cfg.num_heads, cfg.tsa_points
        self.cfg, self.num_bev_queue = cfg, num_bev_queue
        self.sampling_offsets = nn.Linear(e * num_bev_queue, num_bev_queue * m * p * 2)
        self.attention_weights = nn.Linear(e * num_bev_queue, num_bev_queue * m * p)
        self.value_proj = nn.Linear(e, e)
        self.output_proj = nn.Linear(e, e)
        self.variant = 2

    def forward(self, query, query_pos, prev_bev_stack, use_prev_bev, ref_2d):
        cfg, nq, m, p = self.cfg, self.num_bev_queue, self.cfg.num_heads, self.cfg.tsa_points
        n, e = cfg.bev_h * cfg.bev_w, cfg.embed_dims
        # The queue holds [rotated previous BEV, initial BEV query] when the frame continues a scene; at a scene
        # start the gate swaps in the current query twice, exactly as the plugin port does (no Python branch).
        value = use_prev_bev * prev_bev_stack + (1.0 - use_prev_bev) * torch.cat([query, query], 0)
        identity = query
        query = query + query_pos
        qcat = torch.cat([value[0:1], query], -1)
        v = self.value_proj(value).view(nq, n, m, e // m)
        off = self.sampling_offsets(qcat).view(1, n, m, nq, 1, p, 2).permute(0, 3, 1, 2, 4, 5, 6)
        off = off.reshape(nq, n, m, p * 2)
        aw = self.attention_weights(qcat).view(1, n, m, nq, 1, p).permute(0, 3, 1, 2, 4, 5)
        aw = aw.reshape(nq, n, m, p)
        out = _msda(v, _spatial_shapes(cfg.bev_h, cfg.bev_w), ref_2d, off, aw, self.variant)
        # Sizes from the config, not from tensors: a traced x.shape of a custom op's output stays a Shape node.
        out = out.reshape(nq, n, e).mean(0, keepdim=True)
        return self.output_proj(out) + identity


class MSDeformableAttention3D(nn.Module):
    """Inner deformable attention of the spatial cross-attention: 8 points cycling over the 4 height anchors."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        e, m, p = cfg.embed_dims, cfg.num_heads, cfg.sca_points
        self.cfg = cfg
        self.sampling_offsets = nn.Linear(e, m * p * 2)
        self.attention_weights = nn.Linear(e, m * p)
        self.value_proj = nn.Linear(e, e)
        self.variant = 2

    def forward(self, query, value, ref_cam):
        cfg, m, p = self.cfg, self.cfg.num_heads, self.cfg.sca_points
        cams, n, e = cfg.num_cams, cfg.bev_h * cfg.bev_w, cfg.embed_dims
        fh, fw = cfg.feat_hw
        v = self.value_proj(value).view(cams, fh * fw, m, e // m)
        off = self.sampling_offsets(query).view(cams, n, m, p * 2)
        aw = self.attention_weights(query).view(cams, n, m, p)
        ref = ref_cam.reshape(cams, n, 1, cfg.num_points_in_pillar * 2)
        return _msda(v, _spatial_shapes(fh, fw), ref, off, aw, self.variant)


class SpatialCrossAttention(nn.Module):
    """Cross-attention from BEV queries to the 6 camera feature maps, masked per camera and summed."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.deformable_attention = MSDeformableAttention3D(cfg)
        self.output_proj = nn.Linear(cfg.embed_dims, cfg.embed_dims)

    def forward(self, query, feat, ref_cam, bev_mask):
        cfg = self.cfg
        cams = cfg.num_cams
        # Concat rather than repeat/expand: those export with a Where over the sizes that onnx shape inference
        # cannot see through, leaving the camera dimension unknown downstream.
        q6 = torch.cat([query] * cams, 0)
        out = self.deformable_attention(q6, feat, ref_cam).reshape(cams, cfg.bev_h * cfg.bev_w, cfg.embed_dims)
        # bev_mask already holds 1/(number of cameras that see the query), so the sum is the upstream average.
        slots = (out * bev_mask).sum(0, keepdim=True)
        return self.output_proj(slots) + query


class CustomMSDeformableAttention(nn.Module):
    """Decoder cross-attention from the object queries into the BEV map."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        e, m, p = cfg.embed_dims, cfg.num_heads, cfg.dec_points
        self.cfg = cfg
        self.sampling_offsets = nn.Linear(e, m * p * 2)
        self.attention_weights = nn.Linear(e, m * p)
        self.value_proj = nn.Linear(e, e)
        self.output_proj = nn.Linear(e, e)
        self.variant = 2

    def forward(self, query, query_pos, bev, ref_in):
        cfg, m, p = self.cfg, self.cfg.num_heads, self.cfg.dec_points
        n, e = cfg.num_query, cfg.embed_dims
        identity = query
        q = (query + query_pos).permute(1, 0, 2)
        v = self.value_proj(bev.permute(1, 0, 2)).view(1, cfg.bev_h * cfg.bev_w, m, e // m)
        off = self.sampling_offsets(q).view(1, n, m, p * 2)
        aw = self.attention_weights(q).view(1, n, m, p)
        out = _msda(v, _spatial_shapes(cfg.bev_h, cfg.bev_w), ref_in, off, aw, self.variant)
        out = self.output_proj(out.reshape(1, n, e)).permute(1, 0, 2)
        return out + identity


class MultiheadAttention(nn.Module):
    """mmcv's wrapper: the torch module sits under ``attn`` and the residual is added here."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.attn = nn.MultiheadAttention(cfg.embed_dims, cfg.num_heads, dropout=0.1)

    def forward(self, query, query_pos):
        q = query + query_pos
        # need_weights=True as mmcv calls it: the explicit bmm-softmax-bmm path, which opset 13 can express.
        return query + self.attn(q, q, query)[0]


class FFN(nn.Module):
    """mmcv FFN layout: ``layers.0`` = (Linear, ReLU, Dropout), ``layers.1`` = Linear, plus the identity."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.embed_dims, cfg.ffn_dims), nn.ReLU(inplace=True), nn.Dropout(0.0)),
            nn.Linear(cfg.ffn_dims, cfg.embed_dims),
            nn.Dropout(0.0),
        )

    def forward(self, x):
        return x + self.layers(x)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: self_attn, norm, cross_attn, norm, ffn, norm."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.attentions = nn.ModuleList([TemporalSelfAttention(cfg), SpatialCrossAttention(cfg)])
        self.ffns = nn.ModuleList([FFN(cfg)])
        self.norms = nn.ModuleList([nn.LayerNorm(cfg.embed_dims) for _ in range(3)])

    def forward(self, query, bev_pos, prev_bev_stack, use_prev_bev, ref_2d, feat, ref_cam, bev_mask):
        query = self.norms[0](self.attentions[0](query, bev_pos, prev_bev_stack, use_prev_bev, ref_2d))
        query = self.norms[1](self.attentions[1](query, feat, ref_cam, bev_mask))
        return self.norms[2](self.ffns[0](query))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: multi-head self-attention, norm, deformable cross-attention, norm, ffn, norm."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.attentions = nn.ModuleList([MultiheadAttention(cfg), CustomMSDeformableAttention(cfg)])
        self.ffns = nn.ModuleList([FFN(cfg)])
        self.norms = nn.ModuleList([nn.LayerNorm(cfg.embed_dims) for _ in range(3)])

    def forward(self, query, query_pos, bev, ref_in):
        query = self.norms[0](self.attentions[0](query, query_pos))
        query = self.norms[1](self.attentions[1](query, query_pos, bev, ref_in))
        return self.norms[2](self.ffns[0](query))


# ----------------------------------------------------------------------------------------------------------------
# Encoder, decoder, transformer, head
# ----------------------------------------------------------------------------------------------------------------


def _inverse_sigmoid_decoder(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def _inverse_sigmoid_mmdet(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class BEVFormerEncoder(nn.Module):
    """Three encoder layers plus the fixed 3-D/2-D reference grids and the camera projection of the pillars."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.enc_layers)])
        h, w, d = cfg.bev_h, cfg.bev_w, cfg.num_points_in_pillar
        z = cfg.pc_range[5] - cfg.pc_range[2]
        zs = torch.linspace(0.5, z - 0.5, d).view(d, 1, 1).expand(d, h, w) / z
        xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / w).view(1, 1, w).expand(d, h, w)
        ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).view(1, h, 1).expand(d, h, w)
        ref_3d = torch.stack((xs, ys, zs), -1).permute(0, 3, 1, 2).flatten(2).permute(0, 2, 1)[None]
        # Derived constants, not weights: keep them out of the state_dict so checkpoint keys stay upstream's.
        self.register_buffer("ref_3d", ref_3d.contiguous(), persistent=False)  # [1, D, HW, 3]
        self.register_buffer("ref_2d", ref_3d[0, 0, :, :2].reshape(1, h * w, 1, 2).clone(), persistent=False)
        # the pillars' metric extent, as buffers rather than tensors made in forward: a tensor made from a Python
        # list on a GPU is a host-to-device copy, which a CUDA graph cannot capture
        pc = cfg.pc_range
        self.register_buffer("pc_scale", torch.tensor([pc[3] - pc[0], pc[4] - pc[1], pc[5] - pc[2]]), persistent=False)
        self.register_buffer("pc_offset", torch.tensor(pc[:3]), persistent=False)

    def point_sampling(self, lidar2img: torch.Tensor):
        """Project each pillar's 4 height anchors into every camera: normalised (u, v) and per-camera weights."""
        cfg = self.cfg
        d, n, cams = cfg.num_points_in_pillar, cfg.bev_h * cfg.bev_w, cfg.num_cams
        pts = self.ref_3d * self.pc_scale + self.pc_offset
        pts = torch.cat((pts, torch.ones_like(pts[..., :1])), -1).permute(1, 0, 2, 3)  # [D, 1, HW, 4]
        pts = pts.view(d, 1, 1, n, 4, 1)
        cam = torch.matmul(lidar2img.view(1, 1, cams, 1, 4, 4), pts).squeeze(-1)  # [D, 1, cams, HW, 4]
        eps = 1e-5
        depth = cam[..., 2:3]
        mask = (depth > eps).float()
        uv = cam[..., 0:2] / torch.clamp(depth, min=eps)
        u = uv[..., 0:1] / cfg.img_w
        v = uv[..., 1:2] / cfg.img_h
        mask = mask * (v > 0).float() * (v < 1).float() * (u < 1).float() * (u > 0).float()
        uv = torch.cat((u, v), -1)
        ref_cam = uv.permute(2, 1, 3, 0, 4)  # [cams, 1, HW, D, 2]
        mask = mask.permute(2, 1, 3, 0, 4).squeeze(-1)  # [cams, 1, HW, D]
        seen = 1.0 - torch.prod(1.0 - mask, -1)  # any anchor visible
        seen = seen.view(cams, n, 1)
        bev_mask = seen / torch.clamp(seen.sum(0, keepdim=True), min=1e-4)
        return ref_cam, bev_mask

    def forward(self, bev_query, bev_pos, feat, prev_bev_rot, shift, use_prev_bev, lidar2img):
        ref_cam, bev_mask = self.point_sampling(lidar2img)
        query = bev_query.permute(1, 0, 2)  # [1, HW, C]
        pos = bev_pos.permute(1, 0, 2)
        shift_ref = self.ref_2d + shift.view(1, 1, 1, 2) * use_prev_bev
        hybrid_ref = torch.cat([shift_ref, self.ref_2d], 0)  # [2, HW, 1, 2]
        prev_bev_stack = torch.cat([prev_bev_rot.permute(1, 0, 2), query], 0)
        for layer in self.layers:
            query = layer(query, pos, prev_bev_stack, use_prev_bev, hybrid_ref, feat, ref_cam, bev_mask)
        return query.permute(1, 0, 2)  # [HW, 1, C]


class DetectionTransformerDecoder(nn.Module):
    """Six decoder layers; each refines the reference points with the head's regression branch of its level."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.dec_layers)])

    def forward(self, query, query_pos, bev, reference_points, reg_branches):
        states, refs = [], []
        for lid, layer in enumerate(self.layers):
            ref_in = reference_points[..., :2].unsqueeze(2)
            query = layer(query, query_pos, bev, ref_in)
            t = reg_branches[lid](query.permute(1, 0, 2))
            reference_points = torch.sigmoid(
                torch.cat(
                    [
                        t[..., 0:2] + _inverse_sigmoid_decoder(reference_points[..., 0:2]),
                        t[..., 4:5] + _inverse_sigmoid_decoder(reference_points[..., 2:3]),
                    ],
                    -1,
                )
            )
            states.append(query)
            refs.append(reference_points)
        return torch.stack(states), torch.stack(refs)


class PerceptionTransformer(nn.Module):
    """Ego-motion shift, previous-BEV rotation, CAN-bus embedding, encoder and decoder."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        e = cfg.embed_dims
        self.cfg = cfg
        self.encoder = BEVFormerEncoder(cfg)
        self.decoder = DetectionTransformerDecoder(cfg)
        self.level_embeds = nn.Parameter(torch.empty(cfg.num_feature_levels, e))
        self.cams_embeds = nn.Parameter(torch.empty(cfg.num_cams, e))
        self.reference_points = nn.Linear(e, 3)
        self.can_bus_mlp = nn.Sequential(
            nn.Linear(18, e // 2), nn.ReLU(inplace=True), nn.Linear(e // 2, e), nn.ReLU(inplace=True)
        )
        self.can_bus_mlp.add_module("norm", nn.LayerNorm(e))
        self.register_buffer("rotate_center", torch.tensor(cfg.rotate_center), persistent=False)
        self.rotate_variant = 2

    def ego_shift(self, can_bus: torch.Tensor) -> torch.Tensor:
        """BEV-grid shift [1, 2] from the frame's translation delta; atan written without Atan2 as upstream does."""
        cfg = self.cfg
        gx = (cfg.pc_range[3] - cfg.pc_range[0]) / cfg.bev_w
        gy = (cfg.pc_range[4] - cfg.pc_range[1]) / cfg.bev_h
        dx, dy = can_bus[0:1], can_bus[1:2]
        ego_angle = can_bus[16:17] / math.pi * 180
        length = torch.sqrt(dx**2 + dy**2)
        trans_angle = (torch.atan(dy / (dx + 1e-8)) + ((1 - torch.sign(dx)) / 2) * torch.sign(dy) * math.pi)
        trans_angle = trans_angle / math.pi * 180
        bev_angle = ego_angle - trans_angle
        shift_y = length * torch.cos(bev_angle / 180 * math.pi) / gy / cfg.bev_h
        shift_x = length * torch.sin(bev_angle / 180 * math.pi) / gx / cfg.bev_w
        return torch.stack([shift_x, shift_y], -1)  # [1, 2]

    def rotate_prev_bev(self, prev_bev: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        from qdqkit.custom_ops import torch_ops

        cfg = self.cfg
        img = prev_bev.view(cfg.bev_h, cfg.bev_w, cfg.embed_dims).permute(2, 0, 1)
        out = torch_ops.rotate(img, angle, self.rotate_center, interpolation=1, variant=self.rotate_variant)
        return out.permute(1, 2, 0).reshape(cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims)

    def forward(self, feats, bev_queries, object_query_embeds, bev_pos, prev_bev, use_prev_bev, can_bus,
                lidar2img, reg_branches):
        cfg = self.cfg
        shift = self.ego_shift(can_bus)
        # Upstream rotates unconditionally; at a scene start the rotated stale BEV is gated out downstream.
        prev_rot = self.rotate_prev_bev(prev_bev, can_bus[17])
        bev_queries = bev_queries.unsqueeze(1) + self.can_bus_mlp(can_bus.view(1, 18))[None]
        fh, fw = cfg.feat_hw
        feat = feats.reshape(1, cfg.num_cams, cfg.embed_dims, fh * fw).permute(1, 0, 3, 2)  # [cams, 1, HW', C]
        feat = feat + self.cams_embeds[:, None, None, :] + self.level_embeds[None, None, 0:1, :]
        feat = feat.reshape(cfg.num_cams, fh * fw, cfg.embed_dims)
        bev_embed = self.encoder(bev_queries, bev_pos, feat, prev_rot, shift, use_prev_bev, lidar2img)

        query_pos, query = torch.split(object_query_embeds[:, None, :], cfg.embed_dims, dim=2)
        init_ref = torch.sigmoid(self.reference_points(query_pos)).permute(1, 0, 2)  # [1, Q, 3]
        hs, inter_refs = self.decoder(query, query_pos, bev_embed, init_ref, reg_branches)
        return bev_embed, hs, init_ref, inter_refs


class LearnedPositionalEncoding(nn.Module):
    """mmdet learned encoding: column embedding in the first half of the channels, row embedding in the second."""

    def __init__(self, num_feats: int, rows: int, cols: int):
        super().__init__()
        self.row_embed = nn.Embedding(rows, num_feats)
        self.col_embed = nn.Embedding(cols, num_feats)

    def forward(self, h: int, w: int) -> torch.Tensor:
        x = self.col_embed.weight[:w]
        y = self.row_embed.weight[:h]
        # Broadcast by adding zeros (expand exports as a Where chain that neither constant folding nor shape
        # inference resolves); all inputs are weights, so the exporter folds this into one constant.
        zeros = torch.zeros(h, w, 1, device=x.device, dtype=x.dtype)  # on the weights' device: runs on a GPU too
        pos = torch.cat([x[None] + zeros, y[:, None] + zeros], -1)  # [h, w, 2F]
        return pos.reshape(h * w, 1, -1)


class BEVFormerHead(nn.Module):
    """Detection head with box refinement: 6 independent classification and regression branches."""

    def __init__(self, cfg: BEVFormerConfig):
        super().__init__()
        e = cfg.embed_dims
        self.cfg = cfg
        self.transformer = PerceptionTransformer(cfg)
        self.positional_encoding = LearnedPositionalEncoding(cfg.pos_dims, cfg.bev_h, cfg.bev_w)
        self.bev_embedding = nn.Embedding(cfg.bev_h * cfg.bev_w, e)
        self.query_embedding = nn.Embedding(cfg.num_query, e * 2)
        self.code_weights = nn.Parameter(
            torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2])[: cfg.code_size], requires_grad=False
        )

        def cls_branch():
            return nn.Sequential(
                nn.Linear(e, e), nn.LayerNorm(e), nn.ReLU(inplace=True),
                nn.Linear(e, e), nn.LayerNorm(e), nn.ReLU(inplace=True),
                nn.Linear(e, cfg.num_classes),
            )

        def reg_branch():
            return nn.Sequential(
                nn.Linear(e, e), nn.ReLU(inplace=True), nn.Linear(e, e), nn.ReLU(inplace=True),
                nn.Linear(e, cfg.code_size),
            )

        self.cls_branches = nn.ModuleList([cls_branch() for _ in range(cfg.dec_layers)])
        self.reg_branches = nn.ModuleList([reg_branch() for _ in range(cfg.dec_layers)])

    def forward(self, feats, prev_bev, use_prev_bev, can_bus, lidar2img):
        cfg = self.cfg
        pc = cfg.pc_range
        bev_pos = self.positional_encoding(cfg.bev_h, cfg.bev_w)
        bev_embed, hs, init_ref, inter_refs = self.transformer(
            feats, self.bev_embedding.weight, self.query_embedding.weight, bev_pos, prev_bev, use_prev_bev,
            can_bus, lidar2img, self.reg_branches,
        )
        hs = hs.permute(0, 2, 1, 3)  # [L, 1, Q, C]
        classes, coords = [], []
        for lvl in range(cfg.dec_layers):
            ref = _inverse_sigmoid_mmdet(init_ref if lvl == 0 else inter_refs[lvl - 1])
            cls = self.cls_branches[lvl](hs[lvl])
            t = self.reg_branches[lvl](hs[lvl])
            cx = torch.sigmoid(t[..., 0:1] + ref[..., 0:1]) * (pc[3] - pc[0]) + pc[0]
            cy = torch.sigmoid(t[..., 1:2] + ref[..., 1:2]) * (pc[4] - pc[1]) + pc[1]
            cz = torch.sigmoid(t[..., 4:5] + ref[..., 2:3]) * (pc[5] - pc[2]) + pc[2]
            coords.append(torch.cat([cx, cy, t[..., 2:4], cz, t[..., 5:]], -1))
            classes.append(cls)
        return bev_embed, torch.stack(classes), torch.stack(coords)


class BEVFormer(nn.Module):
    """BEVFormer with the five-input, three-output interface of the TensorRT export.

    ``forward(image, prev_bev, use_prev_bev, can_bus, lidar2img) -> (bev_embed, outputs_classes, outputs_coords)``
    with image [1, cams, 3, H, W], prev_bev [HW, 1, C], use_prev_bev [1], can_bus [18], lidar2img [1, cams, 4, 4].
    """

    input_names = ("image", "prev_bev", "use_prev_bev", "can_bus", "lidar2img")
    output_names = ("bev_embed", "outputs_classes", "outputs_coords")

    def __init__(self, cfg: BEVFormerConfig = TINY):
        super().__init__()
        self.cfg = cfg
        self.img_backbone = ResNet(cfg.depth)
        self.img_neck = FPN(self.img_backbone.out_channels, cfg.embed_dims)
        self.pts_bbox_head = BEVFormerHead(cfg)

    def set_variant(self, variant: int) -> None:
        """Choose the plugin op names: 2 -> ``*TRT2`` (the ``cp2`` export), 1 -> ``*TRT`` (``cp``)."""
        if variant not in (1, 2):
            raise ValueError(f"variant must be 1 or 2, got {variant}")
        for mod in self.modules():
            if hasattr(mod, "variant"):
                mod.variant = variant
        self.pts_bbox_head.transformer.rotate_variant = variant

    def forward(self, image, prev_bev, use_prev_bev, can_bus, lidar2img):
        cfg = self.cfg
        fh, fw = cfg.feat_hw
        x = image.view(cfg.num_cams, 3, cfg.img_h, cfg.img_w)
        feats = self.img_neck(self.img_backbone(x)).view(1, cfg.num_cams, cfg.embed_dims, fh, fw)
        return self.pts_bbox_head(feats, prev_bev, use_prev_bev, can_bus, lidar2img)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Zero tensors of the interface shapes (for tracing)."""
        cfg = self.cfg
        return (
            torch.zeros(1, cfg.num_cams, 3, cfg.img_h, cfg.img_w),
            torch.zeros(cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims),
            torch.zeros(1),
            torch.zeros(18),
            torch.eye(4).expand(1, cfg.num_cams, 4, 4).clone(),
        )


def count_parameters(model: nn.Module) -> int:
    """Parameters as the upstream count reports them (BN running statistics excluded, ``code_weights`` included)."""
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: BEVFormerConfig = TINY, seed: int = 0, checkpoint: str | None = None,
                calibrate_bn: bool = True) -> BEVFormer:
    """Build the model in eval mode: seeded weights (default) or an upstream-format checkpoint."""
    from . import weights

    model = BEVFormer(cfg)
    if checkpoint is not None:
        from .checkpoint import load_upstream_checkpoint

        load_upstream_checkpoint(model, checkpoint)
    else:
        weights.init_seeded(model, seed=seed, calibrate_bn=calibrate_bn)
    return model.eval()
