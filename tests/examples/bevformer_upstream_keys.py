"""The upstream BEVFormer-tiny checkpoint layout, written out from the upstream module definitions.

Sources read (not imported): mmdet 2.x ``ResNet`` (depth 50, ``style='pytorch'``, ``norm1_name='bn1'``, Bottleneck
``conv1/bn1/conv2/bn2/conv3/bn3/downsample.{0,1}``), mmdet ``FPN`` (``lateral_convs.i.conv``, ``fpn_convs.i.conv``,
ConvModule), mmcv ``BaseTransformerLayer`` (``attentions``, ``ffns``, ``norms``), mmcv ``FFN`` (``layers.0.0`` Linear,
``layers.1`` Linear), mmcv ``MultiheadAttention`` (``attn`` = ``nn.MultiheadAttention``), BEVFormer's
``TemporalSelfAttention`` / ``SpatialCrossAttention`` (``deformable_attention``, ``output_proj``) /
``MSDeformableAttention3D`` / ``CustomMSDeformableAttention``, ``PerceptionTransformer`` (``level_embeds``,
``cams_embeds``, ``reference_points``, ``can_bus_mlp.{0,2,norm}``) and ``BEVFormerHead`` (``cls_branches``,
``reg_branches``, ``bev_embedding``, ``query_embedding``, ``positional_encoding.{row,col}_embed``, ``code_weights``),
configured by configs/bevformer/bevformer_tiny.py + plugin/bevformer_tiny_trt_p2.py in DerryHub/BEVFormer_tensorrt.
Independent of our model code on purpose: the test compares the two.
"""


def upstream_tiny_keys() -> dict[str, tuple[int, ...]]:
    """Every key of the upstream tiny ``state_dict`` with its shape."""
    k: dict[str, tuple[int, ...]] = {}

    def bn(p, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            k[f"{p}.{s}"] = (c,)
        k[f"{p}.num_batches_tracked"] = ()

    def lin(p, cin, cout):
        k[f"{p}.weight"] = (cout, cin)
        k[f"{p}.bias"] = (cout,)

    def ln(p, c=256):
        k[f"{p}.weight"] = (c,)
        k[f"{p}.bias"] = (c,)

    b = "img_backbone"
    k[f"{b}.conv1.weight"] = (64, 3, 7, 7)
    bn(f"{b}.bn1", 64)
    inplanes = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 << stage
        for i in range(blocks):
            p = f"{b}.layer{stage + 1}.{i}"
            cin = inplanes if i == 0 else planes * 4
            k[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
            bn(f"{p}.bn1", planes)
            k[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            k[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if i == 0:
                k[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
        inplanes = planes * 4

    k["img_neck.lateral_convs.0.conv.weight"] = (256, 2048, 1, 1)
    k["img_neck.lateral_convs.0.conv.bias"] = (256,)
    k["img_neck.fpn_convs.0.conv.weight"] = (256, 256, 3, 3)
    k["img_neck.fpn_convs.0.conv.bias"] = (256,)

    h = "pts_bbox_head"
    t = f"{h}.transformer"
    k[f"{t}.level_embeds"] = (4, 256)
    k[f"{t}.cams_embeds"] = (6, 256)
    lin(f"{t}.reference_points", 256, 3)
    lin(f"{t}.can_bus_mlp.0", 18, 128)
    lin(f"{t}.can_bus_mlp.2", 128, 256)
    ln(f"{t}.can_bus_mlp.norm")

    def ffn(p):
        lin(f"{p}.layers.0.0", 256, 512)
        lin(f"{p}.layers.1", 512, 256)

    for i in range(3):
        p = f"{t}.encoder.layers.{i}"
        lin(f"{p}.attentions.0.sampling_offsets", 512, 2 * 8 * 1 * 4 * 2)
        lin(f"{p}.attentions.0.attention_weights", 512, 2 * 8 * 1 * 4)
        lin(f"{p}.attentions.0.value_proj", 256, 256)
        lin(f"{p}.attentions.0.output_proj", 256, 256)
        d = f"{p}.attentions.1.deformable_attention"
        lin(f"{d}.sampling_offsets", 256, 8 * 1 * 8 * 2)
        lin(f"{d}.attention_weights", 256, 8 * 1 * 8)
        lin(f"{d}.value_proj", 256, 256)
        lin(f"{p}.attentions.1.output_proj", 256, 256)
        ffn(f"{p}.ffns.0")
        for j in range(3):
            ln(f"{p}.norms.{j}")

    for i in range(6):
        p = f"{t}.decoder.layers.{i}"
        k[f"{p}.attentions.0.attn.in_proj_weight"] = (768, 256)
        k[f"{p}.attentions.0.attn.in_proj_bias"] = (768,)
        lin(f"{p}.attentions.0.attn.out_proj", 256, 256)
        lin(f"{p}.attentions.1.sampling_offsets", 256, 8 * 1 * 4 * 2)
        lin(f"{p}.attentions.1.attention_weights", 256, 8 * 1 * 4)
        lin(f"{p}.attentions.1.value_proj", 256, 256)
        lin(f"{p}.attentions.1.output_proj", 256, 256)
        ffn(f"{p}.ffns.0")
        for j in range(3):
            ln(f"{p}.norms.{j}")

    for i in range(6):
        c = f"{h}.cls_branches.{i}"
        lin(f"{c}.0", 256, 256)
        ln(f"{c}.1")
        lin(f"{c}.3", 256, 256)
        ln(f"{c}.4")
        lin(f"{c}.6", 256, 10)
        r = f"{h}.reg_branches.{i}"
        lin(f"{r}.0", 256, 256)
        lin(f"{r}.2", 256, 256)
        lin(f"{r}.4", 256, 10)
    k[f"{h}.code_weights"] = (10,)
    k[f"{h}.bev_embedding.weight"] = (2500, 256)
    k[f"{h}.query_embedding.weight"] = (900, 512)
    k[f"{h}.positional_encoding.row_embed.weight"] = (50, 128)
    k[f"{h}.positional_encoding.col_embed.weight"] = (50, 128)
    return k
