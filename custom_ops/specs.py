"""``CustomOpSpec`` for every BEVFormer TensorRT plugin op: inputs, attributes, shape function, reference, CPU
implementation (ONNX function) and the TensorRT plugin identity with the precisions it accepts.

Each op comes in the two names the upstream exporter writes (``…TRT`` and ``…TRT2``: same maths, different fp16
kernels); both are separate specs, so each answers in domain "" and in ``trt.plugins``. Output types follow
input 0, as every plugin's ``getOutputDataType`` does.
"""

from __future__ import annotations

from typing import Any

from qdqkit.customops import AttrSpec, CustomOpSpec, IOSpec, TensorInfo, TrtPlugin

from . import functions, reference

FLOATS = ("tensor(float)", "tensor(float16)")
INDEX = ("tensor(int64)", "tensor(int32)")


def _dim(info: TensorInfo | None, i: int):
    if info is None or info.shape is None or len(info.shape) <= i:
        return None
    return info.shape[i]


def _elem(info: TensorInfo | None) -> int:
    return info.elem_type if info is not None else 1  # FLOAT when input 0 is unknown


def infer_ms_deform_attn(inputs: list[TensorInfo | None], attrs: dict[str, Any]) -> list[TensorInfo]:
    """[B,S,M,D] value and [B,Q,M,*] offsets give [B,Q,M,D] (the plugin's ``getOutputDimensions``)."""
    value, offsets = inputs[0], inputs[3] if len(inputs) > 3 else None
    shape = (_dim(value, 0), _dim(offsets, 1), _dim(value, 2), _dim(value, 3))
    return [TensorInfo(_elem(value), shape)]


def infer_rotate(inputs: list[TensorInfo | None], attrs: dict[str, Any]) -> list[TensorInfo]:
    """The output has the image's type and shape."""
    img = inputs[0]
    return [TensorInfo(_elem(img), img.shape if img is not None else None)]


def infer_modulated_deform_conv2d(inputs: list[TensorInfo | None], attrs: dict[str, Any]) -> list[TensorInfo]:
    """[N, Cout, Ho, Wo]: N from input, Cout from weight, Ho/Wo from offset (or the conv arithmetic)."""
    x, offset, weight = inputs[0], inputs[1], inputs[3] if len(inputs) > 3 else None
    ho, wo = _dim(offset, 2), _dim(offset, 3)
    for axis in (0, 1):
        size, k = _dim(x, 2 + axis), _dim(weight, 2 + axis)
        known = (ho, wo)[axis]
        if not isinstance(known, int) and isinstance(size, int) and isinstance(k, int):
            s, p, d = (
                list(attrs.get(n) or default)[axis]
                for n, default in (("stride", (1, 1)), ("padding", (0, 0)), ("dilation", (1, 1)))
            )
            computed = (size + 2 * p - d * (k - 1) - 1) // s + 1
            ho, wo = (computed, wo) if axis == 0 else (ho, computed)
    return [TensorInfo(_elem(x), (_dim(x, 0), _dim(weight, 0), ho, wo))]


def infer_grid_sample2d(inputs: list[TensorInfo | None], attrs: dict[str, Any]) -> list[TensorInfo]:
    """[N, C] from input, [Hout, Wout] from the channel-first grid [N, 2, Hout, Wout]."""
    x, grid = inputs[0], inputs[1] if len(inputs) > 1 else None
    return [TensorInfo(_elem(x), (_dim(x, 0), _dim(x, 1), _dim(grid, 2), _dim(grid, 3)))]


def _msda_spec(op_type: str) -> CustomOpSpec:
    same = ("fp32", "fp16", "int8")
    return CustomOpSpec(
        op_type=op_type,
        inputs=(
            IOSpec("value", FLOATS, "[B, S, M, D], S = sum of H_l*W_l"),
            IOSpec("spatial_shapes", INDEX, "[L, 2] rows (H_l, W_l)"),
            IOSpec("reference_points", FLOATS, "[B, Q, 1, 2G] normalised (x, y) per group"),
            IOSpec("sampling_offsets", FLOATS, "[B, Q, M, L*P*2] pixels, ordered [level][point][x,y]"),
            IOSpec("attention_weights", FLOATS, "[B, Q, M, L*P] logits (softmax inside)"),
        ),
        outputs=(IOSpec("output", FLOATS, "[B, Q, M, D]"),),
        infer=infer_ms_deform_attn,
        reference=reference.ms_deform_attn,
        function=functions.ms_deform_attn_function,
        trt=TrtPlugin(
            name=op_type,
            formats={
                # int8 value needs D % 4 == 0 and P % 4 == 0 (all BEVFormer uses); refs stay float then
                "value": same,
                "spatial_shapes": ("int32", "int64"),  # int64 with the TensorRT 10 patch
                "reference_points": ("fp32", "fp16"),
                "sampling_offsets": same,
                "attention_weights": same,
                "output": same,
            },
        ),
        doc="Multi-scale deformable attention (BEVFormer): softmax over the L*P logits, bilinear sampling with "
        "zero padding at ref*size + offset - 0.5 pixels, point p using reference group p mod G.",
    )


def _rotate_spec(op_type: str) -> CustomOpSpec:
    return CustomOpSpec(
        op_type=op_type,
        inputs=(
            IOSpec("img", FLOATS, "[C, H, W]"),
            IOSpec("angle", FLOATS, "0-d, degrees, counter-clockwise"),
            IOSpec("center", FLOATS, "[2] pixel (x, y)"),
        ),
        outputs=(IOSpec("output", FLOATS, "[C, H, W]"),),
        attributes=(AttrSpec("interpolation", "int", 1, "0 bilinear, 1 nearest"),),
        infer=infer_rotate,
        reference=reference.rotate,
        function=functions.rotate_function,
        trt=TrtPlugin(
            name=op_type,
            # int8 img in kCHW4; TRT2 takes fp16 in kCHW2 (TensorRT reformats around it)
            formats={
                "img": ("fp32", "fp16", "int8"),
                "angle": ("fp32", "fp16"),
                "center": ("fp32", "fp16"),
                "output": ("fp32", "fp16", "int8"),
            },
        ),
        doc="Rotate an image about a centre (torchvision.rotate semantics, zero fill).",
    )


def _dcn_spec(op_type: str) -> CustomOpSpec:
    same = ("fp32", "fp16", "int8")
    return CustomOpSpec(
        op_type=op_type,
        inputs=(
            IOSpec("input", FLOATS, "[N, C, H, W]"),
            IOSpec("offset", FLOATS, "[N, dg*2*kh*kw, Ho, Wo], (dy, dx) per tap"),
            IOSpec("mask", FLOATS, "[N, dg*kh*kw, Ho, Wo]"),
            IOSpec("weight", FLOATS, "[Cout, C/groups, kh, kw]"),
            IOSpec("bias", FLOATS, "[Cout]", optional=True),
        ),
        outputs=(IOSpec("output", FLOATS, "[N, Cout, Ho, Wo]"),),
        attributes=(
            AttrSpec("stride", "ints", (1, 1)),
            AttrSpec("padding", "ints", (0, 0)),
            AttrSpec("dilation", "ints", (1, 1)),
            AttrSpec("groups", "int", 1),
            AttrSpec("deform_groups", "int", 1),
        ),
        infer=infer_modulated_deform_conv2d,
        reference=reference.modulated_deform_conv2d,
        function=functions.modulated_deform_conv2d_function,
        trt=TrtPlugin(
            name=op_type,
            # int8 input (kCHW4) needs C % 4 == 0 and Cout/groups % 4 == 0; bias then stays fp32/fp16
            formats={
                "input": same,
                "offset": same,
                "mask": same,
                "weight": same,
                "bias": ("fp32", "fp16"),
                "output": same,
            },
        ),
        doc="Modulated deformable convolution (DCNv2, mmcv semantics). The CPU function needs the bias input.",
    )


def _grid_sampler_spec(op_type: str) -> CustomOpSpec:
    return CustomOpSpec(
        op_type=op_type,
        inputs=(
            IOSpec("input", FLOATS, "[N, C, Hin, Win]"),
            IOSpec("grid", FLOATS, "[N, 2, Hout, Wout], channel-first, scaled x10"),
        ),
        outputs=(IOSpec("output", FLOATS, "[N, C, Hout, Wout]"),),
        attributes=(
            AttrSpec("interpolation_mode", "int", 0, "0 bilinear, 1 nearest, 2 bicubic"),
            AttrSpec("padding_mode", "int", 0, "0 zeros, 1 border, 2 reflection"),
            AttrSpec("align_corners", "int", 0),
        ),
        infer=infer_grid_sample2d,
        reference=reference.grid_sample2d,
        function=functions.grid_sample2d_function,
        trt=TrtPlugin(
            name=op_type,
            formats={
                "input": ("fp32", "fp16", "int8"),
                "grid": ("fp32", "fp16", "int8"),
                "output": ("fp32", "fp16", "int8"),
            },
        ),
        doc="grid_sample with the plugin's grid layout. The CPU function needs opset >= 16.",
    )


def all_specs() -> list[CustomOpSpec]:
    """One spec per plugin name, ``…TRT`` and ``…TRT2`` of each op."""
    specs = []
    for base, make in (
        ("MultiScaleDeformableAttnTRT", _msda_spec),
        ("RotateTRT", _rotate_spec),
        ("ModulatedDeformableConv2dTRT", _dcn_spec),
        ("GridSampler2DTRT", _grid_sampler_spec),
    ):
        specs.append(make(base))
        specs.append(make(base + "2"))
    return specs


SPECS = all_specs()
"""The specs the ``bevformer-ops`` plugin registers (built once, so every registry gets the same objects)."""
