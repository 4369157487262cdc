"""The specs: registration through the plugin, both domains, schemas, shape functions vs real outputs, TRT identity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from custom_ops_cases import BEVFORMER_TINY_MSDA, ODD_MSDA, msda_inputs, one_node_model, registry, run_cpu
from qdqkit.custom_ops.specs import SPECS
from test_ops_reference import DCN_CASES, dcn_inputs

from qdqkit.customops import TensorInfo

NAMES = {
    "MultiScaleDeformableAttnTRT",
    "MultiScaleDeformableAttnTRT2",
    "RotateTRT",
    "RotateTRT2",
    "ModulatedDeformableConv2dTRT",
    "ModulatedDeformableConv2dTRT2",
    "GridSampler2DTRT",
    "GridSampler2DTRT2",
}


@pytest.fixture(scope="module")
def reg():
    return registry()


def test_plugin_registers_every_op_in_both_domains(reg):
    assert {s.op_type for s in reg} == NAMES and len(reg) == 8
    for name in NAMES:
        spec = reg.lookup("", name)
        assert spec is not None and spec.op_type == name
        assert reg.lookup("ai.onnx", name) is spec
        assert reg.lookup("trt.plugins", name) is spec
    assert reg.lookup("", "RotateTRT3") is None


def test_plugin_is_reachable_through_the_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="qdqkit")}
    assert eps.get("bevformer-ops") == "qdqkit.custom_ops.plugin"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.op_type)
def test_trt_identity_and_formats(spec):
    assert (spec.trt.name, spec.trt.version, spec.trt.namespace) == (spec.op_type, "1", "")
    io_names = {i.name for i in spec.inputs} | {o.name for o in spec.outputs}
    assert set(spec.trt.formats) == io_names
    assert all(set(f) <= {"fp32", "fp16", "int8", "int32", "int64"} and f for f in spec.trt.formats.values())
    assert "fp32" in spec.trt.formats[spec.inputs[0].name]
    assert spec.reference is not None and spec.function is not None and spec.doc


def test_msda_formats_follow_the_plugin():
    spec = next(s for s in SPECS if s.op_type == "MultiScaleDeformableAttnTRT2")
    assert spec.trt.formats["spatial_shapes"] == ("int32", "int64")
    assert "int8" in spec.trt.formats["value"] and "int8" not in spec.trt.formats["reference_points"]


def _info(a: np.ndarray) -> TensorInfo:
    return TensorInfo(onnx.helper.np_dtype_to_tensor_dtype(a.dtype), tuple(a.shape))


def _cases():
    for name, case in {**BEVFORMER_TINY_MSDA, **ODD_MSDA}.items():
        yield f"msda-{name}", "MultiScaleDeformableAttnTRT2", msda_inputs(case, seed=1), {}
    rng = np.random.default_rng(0)
    for shape in [(256, 50, 50), (3, 1, 7)]:
        inputs = [
            rng.standard_normal(shape).astype(np.float32),
            np.array(10.0, np.float32),
            np.array([1.0, 2.0], np.float32),
        ]
        yield f"rotate-{shape}", "RotateTRT", inputs, {"interpolation": 1}
    for name, cfg in DCN_CASES.items():
        arrays, attrs = dcn_inputs(cfg, dtype=np.float32)
        yield (
            f"dcn-{name}",
            "ModulatedDeformableConv2dTRT",
            arrays,
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items()},
        )
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    yield "gridsampler", "GridSampler2DTRT2", [x, rng.uniform(-10, 10, (2, 2, 4, 9)).astype(np.float32)], {}


CASES = list(_cases())


@pytest.mark.parametrize("name,op,inputs,attrs", CASES, ids=[c[0] for c in CASES])
def test_shape_function_matches_kernel_output(reg, name, op, inputs, attrs):
    spec = reg.lookup("", op)
    (info,) = spec.infer([_info(a) for a in inputs], spec.attrs_with_defaults(attrs))
    opset = 17
    got = run_cpu(reg, one_node_model(op, inputs, attrs, opset), inputs)
    assert info.shape == got.shape and info.elem_type == onnx.TensorProto.FLOAT
    # the same through onnx shape inference (the registered schema), in both domains
    for domain in ("", "trt.plugins"):
        model = one_node_model(op, inputs, attrs, opset, domain)
        onnx.checker.check_model(model, full_check=True)
        out = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0].type.tensor_type
        assert tuple(d.dim_value for d in out.shape.dim) == got.shape
        assert out.elem_type == onnx.TensorProto.FLOAT


def test_shape_function_fp16_and_partial_knowledge(reg):
    spec = reg.lookup("", "MultiScaleDeformableAttnTRT2")
    f16 = onnx.TensorProto.FLOAT16
    value = TensorInfo(f16, ("B", 375, 8, 32))
    (out,) = spec.infer([value, None, None, TensorInfo(f16, ("B", 2500, 8, 16)), None], {})
    assert out == TensorInfo(f16, ("B", 2500, 8, 32))
    (out,) = spec.infer([value, None, None, None, None], {})
    assert out.shape == ("B", None, 8, 32)


def test_dcn_shape_function_without_offset_shape(reg):
    spec = reg.lookup("", "ModulatedDeformableConv2dTRT")
    x = TensorInfo(1, (2, 4, 7, 6))
    weight = TensorInfo(1, (6, 2, 3, 3))
    attrs = spec.attrs_with_defaults({"stride": [2, 2], "padding": [2, 2], "dilation": [2, 2]})
    (out,) = spec.infer([x, TensorInfo(1, None), None, weight, None], attrs)
    cfg = DCN_CASES["s2-d2-g2-dg2"]
    arrays, _ = dcn_inputs(cfg)
    assert out.shape == (2, 6) + arrays[1].shape[2:]


def test_checker_rejects_a_wrong_attribute_type(reg):
    x = np.zeros((1, 2, 3), np.float32)
    inputs = [x, np.array(1.0, np.float32), np.zeros(2, np.float32)]
    model = one_node_model("RotateTRT2", inputs, {"interpolation": 1.5}, 13)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)


def test_qdqkit_ops_lists_every_op_with_its_plugin_identity(capsys):
    from qdqkit.cli import main

    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    for spec in SPECS:
        assert f"(default)::{spec.op_type}  [plugin bevformer-ops]" in out
        assert f"tensorrt:   plugin {spec.op_type} version 1 namespace (empty)" in out
    assert "value:fp32|fp16|int8, spatial_shapes:int32|int64, reference_points:fp32|fp16" in out
    assert "attributes: interpolation:int=1" in out
