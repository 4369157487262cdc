"""The CPU implementation (ONNX functions run by onnxruntime) against the numpy references.

Tolerance (float32 kernels vs the float64 reference, O(1) data): |got - want| <= 2e-5 + 2e-5*|want| for MSDA;
1e-4 for DCN and GridSample, 2e-4 for bilinear Rotate (float32 sampling coordinates far from the centre); nearest
Rotate is exact. fp16 models: 2e-2 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest
from custom_ops_cases import BEVFORMER_TINY_MSDA, ODD_MSDA, msda_inputs, one_node_model, registry, run_cpu
from qdqkit.custom_ops import functions
from qdqkit.custom_ops import reference as R
from test_ops_reference import DCN_CASES, dcn_inputs

ATOL = RTOL = 2e-5
OPSETS = list(range(13, 22))


@pytest.fixture(scope="module")
def reg():
    return registry()


def assert_close(got, want, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(got.astype(np.float64), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "name,opset", [("tsa", 13), ("tsa", 19), ("sca", 13), ("decoder", 13), ("decoder", 19)]
)
def test_msda_bevformer_tiny_shapes(reg, name, opset):
    inputs = msda_inputs(BEVFORMER_TINY_MSDA[name], seed=opset)
    model = one_node_model("MultiScaleDeformableAttnTRT2", inputs, {}, opset)
    got = run_cpu(reg, model, inputs)
    assert got.dtype == np.float32
    assert_close(got, R.ms_deform_attn(*inputs))


@pytest.mark.parametrize("name", list(ODD_MSDA))
@pytest.mark.parametrize(
    "opset,domain", [(o, "") for o in OPSETS] + [(13, "trt.plugins"), (19, "trt.plugins")]
)
def test_msda_odd_sizes_every_opset(reg, name, opset, domain):
    inputs = msda_inputs(ODD_MSDA[name], seed=opset, spread=0.4)
    model = one_node_model("MultiScaleDeformableAttnTRT", inputs, {}, opset, domain)
    assert_close(run_cpu(reg, model, inputs), R.ms_deform_attn(*inputs))


@pytest.mark.parametrize("name", list(ODD_MSDA) + ["decoder"])
@pytest.mark.parametrize(
    "sampler,opset", [("gather", 13), ("gather", 20), ("gridsample", 17), ("gridsample", 21)]
)
def test_msda_alternative_formulations_are_exact_too(name, sampler, opset):
    """The alternatives kept for the benchmark compute the same maths as the shipped table form."""
    import onnxruntime as ort

    assert functions.MSDA_SAMPLER == "table"
    inputs = msda_inputs({**ODD_MSDA, **BEVFORMER_TINY_MSDA}[name], seed=7, spread=0.4)
    model = one_node_model("MultiScaleDeformableAttnTRT2", inputs, {}, opset, "trt.plugins")
    fn = functions.ms_deform_attn_function(opset, sampler=sampler)
    fn.domain, fn.name = "trt.plugins", "MultiScaleDeformableAttnTRT2"
    model.functions.append(fn)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], inputs)))[0]
    assert_close(got, R.ms_deform_attn(*inputs))


def test_msda_unknown_sampler_and_gridsample_below_16():
    with pytest.raises(ValueError, match="unknown MSDA sampler"):
        functions.ms_deform_attn_function(13, sampler="loop")
    with pytest.raises(ValueError, match="opset 16"):
        functions.ms_deform_attn_function(15, sampler="gridsample")


@pytest.mark.parametrize("outside", ["all", "first-batch", "some-queries"])
def test_msda_rows_that_see_nothing(reg, outside):
    """Rows whose samples all fall outside are skipped by the function; they must still come out as zeros."""
    inputs = msda_inputs(ODD_MSDA["odd-groups"], seed=5)
    ref = inputs[2]
    if outside == "all":
        ref[:] = 7.0
    elif outside == "first-batch":
        ref[0] = -6.0
    else:
        ref[:, ::2] = 9.0
    want = R.ms_deform_attn(*inputs)
    got = run_cpu(reg, one_node_model("MultiScaleDeformableAttnTRT2", inputs, {}, 13), inputs)
    assert_close(got, want)
    assert (want == 0).any() and (outside == "all") == (not want.any())


def test_msda_int32_spatial_shapes(reg):
    inputs = msda_inputs(ODD_MSDA["odd-levels"], seed=3)
    inputs[1] = inputs[1].astype(np.int32)
    model = one_node_model("MultiScaleDeformableAttnTRT2", inputs, {}, 13)
    assert_close(run_cpu(reg, model, inputs), R.ms_deform_attn(*inputs))


@pytest.mark.parametrize("opset", [15, 19, 21])
def test_msda_fp16_model(reg, opset):
    inputs = msda_inputs(BEVFORMER_TINY_MSDA["decoder"], seed=1, dtype=np.float16)
    model = one_node_model("MultiScaleDeformableAttnTRT2", inputs, {}, opset)
    got = run_cpu(reg, model, inputs)
    assert got.dtype == np.float16
    assert_close(got, R.ms_deform_attn(*inputs), atol=2e-2, rtol=1e-2)


ROTATE_CASES = {
    "bevformer-tiny": ((256, 50, 50), (100.0, 100.0)),
    "odd-centre-inside": ((3, 7, 5), (2.2, 3.9)),
    "odd-one-row": ((2, 1, 9), (4.5, 0.5)),
}


@pytest.mark.parametrize("name", list(ROTATE_CASES))
@pytest.mark.parametrize("opset", [13, 15, 18, 21])  # the body differs only at 15 (CastLike)
@pytest.mark.parametrize("interpolation", [0, 1])
def test_rotate_opsets(reg, name, opset, interpolation):
    shape, center = ROTATE_CASES[name]
    rng = np.random.default_rng(opset * 2 + interpolation)
    img = rng.standard_normal(shape).astype(np.float32)
    angle = np.array(rng.uniform(-180, 180), dtype=np.float32)
    inputs = [img, angle, np.array(center, dtype=np.float32)]
    model = one_node_model("RotateTRT2", inputs, {"interpolation": interpolation}, opset)
    got = run_cpu(reg, model, inputs)
    want = R.rotate(img, angle, center, interpolation)
    if interpolation == 1:
        # float32 vs float64 coordinates may round differently within ~1e-5 px of a .5 boundary; none here
        np.testing.assert_array_equal(got, want.astype(np.float32))
    else:
        # coordinates reach ~150 px (centre (100, 100)): float32 puts them ~1e-5 px off, times pixel differences
        assert_close(got, want, atol=2e-4)


def test_rotate_default_interpolation_is_nearest(reg):
    img = np.random.default_rng(0).standard_normal((2, 6, 6)).astype(np.float32)
    inputs = [img, np.array(33.0, np.float32), np.array([3.0, 3.0], np.float32)]
    got = run_cpu(reg, one_node_model("RotateTRT", inputs, {}, 13), inputs)
    np.testing.assert_array_equal(got, R.rotate(img, 33.0, (3.0, 3.0), 1).astype(np.float32))


def test_rotate_fp16_model(reg):
    img = np.random.default_rng(1).standard_normal((4, 10, 10)).astype(np.float16)
    inputs = [img, np.array(-21.0, np.float16), np.array([5.0, 5.0], np.float16)]
    got = run_cpu(reg, one_node_model("RotateTRT2", inputs, {"interpolation": 0}, 17), inputs)
    assert got.dtype == np.float16
    assert_close(got, R.rotate(img, -21.0, (5.0, 5.0), 0), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", list(DCN_CASES))
@pytest.mark.parametrize("opset", [13, 18, 21])
def test_dcn(reg, name, opset):
    arrays, attrs = dcn_inputs(DCN_CASES[name], seed=opset, dtype=np.float32)
    node_attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items()}
    model = one_node_model("ModulatedDeformableConv2dTRT2", arrays, node_attrs, opset)
    assert_close(run_cpu(reg, model, arrays), R.modulated_deform_conv2d(*arrays, **attrs), atol=1e-4)


@pytest.mark.parametrize("opset", [16, 20])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("padding_mode", [0, 1, 2])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sampler(reg, opset, mode, padding_mode, align_corners):
    rng = np.random.default_rng(opset + mode * 7 + padding_mode * 3 + align_corners)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    grid = rng.uniform(-13, 13, (2, 2, 4, 7)).astype(np.float32)
    attrs = {"interpolation_mode": mode, "padding_mode": padding_mode, "align_corners": align_corners}
    got = run_cpu(reg, one_node_model("GridSampler2DTRT", [x, grid], attrs, opset), [x, grid])
    assert_close(got, R.grid_sample2d(x, grid, mode, padding_mode, align_corners), atol=1e-4)


def test_grid_sampler_below_opset_16_is_a_user_error(reg):
    from qdqkit.errors import UserError

    x = np.zeros((1, 1, 2, 2), np.float32)
    grid = np.zeros((1, 2, 2, 2), np.float32)
    with pytest.raises(UserError, match="opset 16"):
        run_cpu(reg, one_node_model("GridSampler2DTRT2", [x, grid], {}, 13), [x, grid])
