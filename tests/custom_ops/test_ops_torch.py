"""The autograd Functions: plain-PyTorch forward against the references, gradients, fp16, and the exported node."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from custom_ops_cases import BEVFORMER_TINY_MSDA, ODD_MSDA, msda_inputs, registry
from qdqkit.custom_ops import reference as R
from qdqkit.custom_ops import torch_ops as T
from test_ops_reference import DCN_CASES, dcn_inputs


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("name", list(ODD_MSDA) + ["decoder"])
def test_msda_forward_matches_reference(name):
    case = {**ODD_MSDA, **BEVFORMER_TINY_MSDA}[name]
    inputs = msda_inputs(case, seed=11, spread=0.4)
    got = T.ms_deform_attn(*map(t, inputs)).numpy()
    np.testing.assert_allclose(got, R.ms_deform_attn(*inputs), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("interpolation", [0, 1])
def test_rotate_forward_matches_reference(interpolation):
    rng = np.random.default_rng(interpolation)
    img = rng.standard_normal((5, 12, 9)).astype(np.float32)
    for angle in (0.0, 17.5, -133.0):
        got = T.rotate(t(img), torch.tensor(angle), torch.tensor([4.0, 6.5]), interpolation).numpy()
        want = R.rotate(img, angle, (4.0, 6.5), interpolation)
        if interpolation == 1:
            np.testing.assert_array_equal(got, want.astype(np.float32))
        else:
            np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", list(DCN_CASES))
def test_dcn_forward_matches_reference(name):
    arrays, attrs = dcn_inputs(DCN_CASES[name], seed=5, dtype=np.float32)
    got = T.modulated_deform_conv2d(*map(t, arrays), **attrs).numpy()
    np.testing.assert_allclose(got, R.modulated_deform_conv2d(*arrays, **attrs), atol=1e-4)


def test_dcn_forward_without_bias():
    arrays, attrs = dcn_inputs(DCN_CASES["3x3-s1-p1"], seed=6, dtype=np.float32)
    got = T.modulated_deform_conv2d(*map(t, arrays[:4]), None, **attrs).numpy()
    want = R.modulated_deform_conv2d(*arrays[:4], None, **attrs)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("mode,padding_mode,align_corners", [(0, 0, 0), (1, 1, 1), (2, 2, 0)])
def test_grid_sample_forward_matches_reference(mode, padding_mode, align_corners):
    rng = np.random.default_rng(mode)
    x = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    grid = rng.uniform(-12, 12, (1, 2, 3, 3)).astype(np.float32)
    got = T.grid_sample2d(t(x), t(grid), mode, padding_mode, align_corners).numpy()
    np.testing.assert_allclose(got, R.grid_sample2d(x, grid, mode, padding_mode, align_corners), atol=1e-5)


def test_fp16_inputs_give_fp16_outputs():
    inputs = msda_inputs(ODD_MSDA["odd-levels"], seed=2)
    half = [t(a).half() if a.dtype == np.float32 else t(a) for a in inputs]
    out = T.ms_deform_attn(*half)
    assert out.dtype == torch.float16
    np.testing.assert_allclose(out.float().numpy(), R.ms_deform_attn(*[h.numpy() for h in half]), atol=2e-2)
    img = torch.randn(3, 6, 6).half()
    assert T.rotate(img, torch.tensor(30.0).half(), torch.tensor([3.0, 3.0]).half(), 0).dtype == torch.float16


def test_msda_gradients():
    inputs = msda_inputs((1, [[3, 4], [2, 2]], 3, 2, 2, 2, 2), seed=3, spread=0.2, dtype=np.float64)
    args = [t(a).requires_grad_(a.dtype == np.float64) for a in inputs]
    assert torch.autograd.gradcheck(lambda *a: T.ms_deform_attn(*a), args, eps=1e-6, atol=1e-5)


def test_dcn_and_rotate_gradients():
    arrays, attrs = dcn_inputs(DCN_CASES["odd-1x3"], seed=8)
    args = [t(a).requires_grad_() for a in arrays]
    assert torch.autograd.gradcheck(
        lambda *a: T.modulated_deform_conv2d(*a, **attrs), args, eps=1e-6, atol=1e-5
    )
    img = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda i: T.rotate(i, torch.tensor(25.0, dtype=torch.float64), torch.tensor([2.0, 3.0]), 0), (img,)
    )


def test_rotate_takes_python_numbers():
    img = torch.randn(2, 7, 6)
    got = T.rotate(img, 21.0, (3.0, 2.5), 0)
    torch.testing.assert_close(got, T.rotate(img, torch.tensor(21.0), torch.tensor([3.0, 2.5]), 0))


def test_variant_must_be_1_or_2():
    with pytest.raises(ValueError, match="variant"):
        T.rotate(torch.zeros(1, 2, 2), torch.tensor(0.0), torch.zeros(2), 1, variant=3)


def test_cpu_tensors_never_reach_the_cuda_kernels():
    assert T._cuda_kernel("ms_deform_attn", [torch.zeros(1)]) is None


@pytest.mark.gpu
def test_cuda_tensors_go_to_the_cuda_kernels(monkeypatch):
    from qdqkit.custom_ops import cuda

    if not torch.cuda.is_available() or not cuda.available():
        pytest.skip("needs a CUDA GPU with the qdqkit.custom_ops.cuda kernels usable")
    calls = []
    real = cuda.ms_deform_attn
    monkeypatch.setattr(cuda, "ms_deform_attn", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = [t(a).cuda() for a in msda_inputs(BEVFORMER_TINY_MSDA["decoder"], seed=2)]
    got = T.ms_deform_attn(*inputs)
    assert calls and got.is_cuda
    torch.testing.assert_close(got, T.ms_deform_attn_torch(*inputs), atol=1e-4, rtol=1e-4)


class AllOps(torch.nn.Module):
    """One of each op; ``variant`` picks the …TRT or …TRT2 names."""

    def __init__(self, variant: int):
        super().__init__()
        self.variant = variant
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(6, 2, 3, 3, generator=gen))
        self.bias = torch.nn.Parameter(torch.randn(6, generator=gen))

    def forward(self, value, ref, offsets, logits, img, angle, x, offset, mask):
        shapes = torch.tensor([[7, 5], [3, 4], [1, 1]], dtype=torch.int64)
        a = T.ms_deform_attn(value, shapes, ref, offsets, logits, variant=self.variant)
        b = T.rotate(img, angle, torch.tensor([100.0, 100.0]), 1, variant=self.variant)
        c = T.modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias, (2, 2), (2, 2), (2, 2), 2, 2, variant=self.variant
        )
        return a.flatten(2) * 2, b + 1, torch.relu(c)


def _all_ops_inputs():
    msda = msda_inputs(ODD_MSDA["odd-levels"], seed=4)
    rng = np.random.default_rng(9)
    img = rng.standard_normal((16, 50, 50)).astype(np.float32)
    (x, offset, mask, _, _), _ = dcn_inputs(DCN_CASES["s2-d2-g2-dg2"], seed=9, dtype=np.float32)
    arrays = [msda[0], msda[2], msda[3], msda[4], img, np.array(12.5, np.float32), x, offset, mask]
    return [t(a) for a in arrays]


def _export(module, args, opset=13) -> onnx.ModelProto:
    buf = io.BytesIO()
    names = ["value", "ref", "offsets", "logits", "img", "angle", "x", "offset", "mask"]
    torch.onnx.export(
        module,
        tuple(args),
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=names,
        output_names=["msda", "rotated", "dcn"],
    )
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("variant", [1, 2])
def test_export_emits_the_upstream_nodes(variant):
    model = _export(AllOps(variant).eval(), _all_ops_inputs())
    suffix = "TRT2" if variant == 2 else "TRT"
    custom = {n.op_type: n for n in model.graph.node if n.op_type.endswith(suffix)}
    assert set(custom) == {
        f"MultiScaleDeformableAttn{suffix}",
        f"Rotate{suffix}",
        f"ModulatedDeformableConv2d{suffix}",
    }
    assert all(n.domain == "" for n in custom.values())
    msda = custom[f"MultiScaleDeformableAttn{suffix}"]
    assert len(msda.input) == 5 and not msda.attribute
    rot = custom[f"Rotate{suffix}"]
    assert len(rot.input) == 3
    assert [(a.name, a.type, a.i) for a in rot.attribute] == [("interpolation", onnx.AttributeProto.INT, 1)]
    dcn = custom[f"ModulatedDeformableConv2d{suffix}"]
    assert len(dcn.input) == 5
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dcn.attribute}
    assert attrs == {"stride": [2, 2], "padding": [2, 2], "dilation": [2, 2], "groups": 2, "deform_groups": 2}
    assert {a.name: a.type for a in dcn.attribute}["stride"] == onnx.AttributeProto.INTS
    # the spatial_shapes input is an int64 constant [L, 2]
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    src = msda.input[1]
    tensor = inits[src] if src in inits else producers[src].attribute[0].t
    assert tensor.data_type == onnx.TensorProto.INT64 and list(tensor.dims) == [3, 2]


def _fully_static(value_info) -> bool:
    tt = value_info.type.tensor_type
    return tt.elem_type != 0 and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)


def test_exported_model_checks_infers_and_runs_like_pytorch():
    """Export -> checker (with the schemas) -> onnx shape inference types every custom output -> onnxsim folds the
    Shape/Reshape glue behind them so every tensor is static -> onnxruntime on the CPU equals the PyTorch forward."""
    import onnxsim

    reg = registry()
    module = AllOps(2).eval()
    args = _all_ops_inputs()
    model = _export(module, args)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    by_name = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    custom = [n for n in inferred.graph.node if n.op_type.endswith("TRT2")]
    assert len(custom) == 3
    for node in custom:
        assert _fully_static(by_name[node.output[0]]), node.op_type
        assert by_name[node.output[0]].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    simplified, ok = onnxsim.simplify(model)
    assert ok
    onnx.checker.check_model(simplified, full_check=True)
    simplified = onnx.shape_inference.infer_shapes(simplified, strict_mode=True)
    values = list(simplified.graph.value_info) + list(simplified.graph.output)
    assert values and all(_fully_static(v) for v in values)
    expected = [o.detach().numpy() for o in module(*args)]
    out_shapes = [tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in simplified.graph.output]
    assert out_shapes == [e.shape for e in expected]

    feed = {
        n: a.numpy()
        for n, a in zip(["value", "ref", "offsets", "logits", "img", "angle", "x", "offset", "mask"], args)
    }
    for m in (model, simplified):
        sess = reg.session(m)
        got = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)
    assert not model.functions  # the execution functions went into a copy only


def test_grid_sampler_export_at_opset_16_runs():
    reg = registry()

    class GS(torch.nn.Module):
        def forward(self, x, grid):
            return T.grid_sample2d(x, grid, 0, 1, 0) * 3

    x, grid = torch.randn(1, 3, 6, 5), torch.rand(1, 2, 4, 4) * 24 - 12
    buf = io.BytesIO()
    torch.onnx.export(GS(), (x, grid), buf, dynamo=False, opset_version=16)
    model = onnx.load_from_string(buf.getvalue())
    node = next(n for n in model.graph.node if n.op_type == "GridSampler2DTRT2")
    assert {a.name: a.i for a in node.attribute} == {
        "interpolation_mode": 0,
        "padding_mode": 1,
        "align_corners": 0,
    }
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(model, strict_mode=True), full_check=True)
    sess = reg.session(model)
    got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], [x.numpy(), grid.numpy()])))[0]
    np.testing.assert_allclose(got, GS()(x, grid).numpy(), atol=1e-5)
