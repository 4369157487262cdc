"""BEVFormer-tiny's PyTorch forward on a GPU with the CUDA kernels: it launches them (12 MSDA calls and one Rotate a
frame), it agrees with the grid_sample formulation, and it can be captured in a CUDA graph (nothing in the forward
copies from host memory or reads a device value back), whose replays give the eager frame's outputs bit for bit,
also after new inputs are copied into the captured ones. `benchmarks/gpu_frame.py` times the frame both ways.
"""

import pytest

from qdqkit.custom_ops import cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(),
                                                  reason=f"CUDA kernels unavailable: {cuda.unavailable_reason()}")]


def _frame(cfg, index, device):
    import numpy as np
    import torch

    from qdqkit.examples.bevformer.data import INPUT_NAMES, SceneGenerator

    sample = SceneGenerator(cfg, seed=0).inputs(index)
    sample["prev_bev"] = np.random.default_rng(index).standard_normal((cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims))
    return tuple(torch.tensor(np.asarray(sample[k], np.float32), device=device) for k in INPUT_NAMES)


@pytest.fixture(scope="module")
def model():
    import torch

    from qdqkit.examples.bevformer.model import TINY, build_model

    torch.manual_seed(0)
    return build_model(TINY, seed=0, calibrate_bn=False).to("cuda")


@pytest.fixture
def launches(monkeypatch):
    counts = {}
    for name in ("ms_deform_attn", "rotate"):
        real = getattr(cuda, name)

        def counting(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(cuda, name, counting)
    return counts


def test_frame_launches_the_kernels_and_matches_the_formulation(model, launches, monkeypatch):
    import torch

    inputs = _frame(model.cfg, 3, "cuda")
    with torch.no_grad():
        got = model(*inputs)
    assert launches == {"ms_deform_attn": 12, "rotate": 1}
    launches.clear()
    monkeypatch.setattr(cuda, "available", lambda: False)
    with torch.no_grad():
        want = model(*inputs)
    assert launches == {}
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert float((g.double() - w.double()).norm() / w.double().norm()) < 1e-5


def test_frame_replays_from_a_cuda_graph_bit_for_bit(model, launches):
    import torch

    static = _frame(model.cfg, 3, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # first-use kernel builds and cuDNN's algorithm choice happen outside the capture
            model(*static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    launches.clear()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = model(*static)
    assert launches == {"ms_deform_attn": 12, "rotate": 1}
    for index in (3, 5):  # the captured inputs, then another frame copied into them
        fresh = _frame(model.cfg, index, "cuda")
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        for out in captured:
            out.fill_(float("nan"))
        graph.replay()
        with torch.no_grad():
            eager = model(*fresh)
        torch.cuda.synchronize()
        for c, e in zip(captured, eager):
            assert torch.equal(c, e), f"frame {index}: graph replay differs from the eager forward"
