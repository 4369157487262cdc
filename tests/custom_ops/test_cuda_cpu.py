"""What of the CUDA sub-package must hold on any machine, GPU or not: it imports without CuPy, TensorRT or a GPU,
says why the kernels are unavailable, the sources compile (where nvcc is present), and the PTX that TensorRT
plugins embed has exactly the parameter list of TensorRT's AOT ABI (inputs, int32 extras, outputs)."""

import re
import shutil
import subprocess
import sys

import pytest

from qdqkit.custom_ops.cuda import _build
from qdqkit.custom_ops.cuda import trt_plugins as tp


def test_import_pulls_in_no_gpu_library():
    code = ("import sys; import qdqkit.custom_ops.cuda as c; import qdqkit.custom_ops.cuda.trt_plugins; "
            "c.available(); bad = [m for m in ('cupy', 'tensorrt', 'triton', 'cuda.bindings') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_available_is_a_bool_with_a_reason_when_false():
    from qdqkit.custom_ops import cuda

    ok = cuda.available()
    assert isinstance(ok, bool)
    reason = cuda.unavailable_reason()
    assert (reason is None) == ok
    if not ok:
        assert isinstance(reason, str) and "\n" not in reason


def test_register_without_tensorrt_says_so_in_one_line():
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(tp.TensorRTUnavailable) as info:
        tp.register()
    assert "\n" not in str(info.value) and "TensorRT" in str(info.value)


def test_invalid_namespace_is_refused():
    from qdqkit.errors import UserError

    with pytest.raises(UserError, match="namespace"):
        tp.register(namespace="trt.plugins")


def test_sources_inline_their_includes():
    for name in _build.SOURCES:
        text = _build.source(name)
        assert '#include "' not in text and "qk_h2f" in text


def _ptx_params(ptx: str):
    """{kernel: [param types]} from PTX ``.entry`` declarations."""
    entries = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        entries[m.group(1)] = re.findall(r"\.param\s+\.(\w+)", m.group(2))
    return entries


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("launch,n_in,n_out", [
    (tp.msda_launch("fp32", (6, 375, 8, 32), 1, 8, 8, 2500), 5, 1),
    (tp.msda_launch("fp32", (6, 375, 8, 32), 1, 8, 8, 2500, form="global"), 5, 1),
    (tp.msda_launch("int8", (6, 375, 8, 32), 1, 8, 8, 2500, scales=(0.1, 0.2, 0.3, 0.4), form="global"), 5, 1),
    (tp.msda_launch("fp16", (2, 2500, 8, 32), 1, 2, 4, 2500), 5, 1),
    (tp.msda_launch("fp16", (6, 375, 8, 32), 1, 8, 8, 2500), 5, 1),
    (tp.msda_launch("fp16", (1, 10, 2, 3), 1, 2, 4, 7), 5, 1),
    (tp.msda_launch("int8", (6, 375, 8, 32), 1, 8, 8, 2500, scales=(0.1, 0.2, 0.3, 0.4)), 5, 1),
    (tp.msda_launch("int8", (2, 2500, 8, 32), 1, 2, 4, 2500, scales=(0.1, 0.2, 0.3, 0.4)), 5, 1),
    (tp.rotate_launch("fp16", (256, 50, 50), 1), 3, 1),
    (tp.dcn_launch("fp32", (1, 8, 9, 9), (4, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, 1), 5, 1),
])
def test_ptx_parameter_list_is_trt_aot_abi(launch, n_in, n_out):
    """Pointers (.u64) for each tensor input, one 32-bit param per int32 extra, pointers for outputs."""
    params = _ptx_params(tp.ptx(launch.source).decode())
    assert launch.kernel in params, f"{launch.kernel} not in PTX entries {sorted(params)}"
    types = params[launch.kernel]
    expect = ["u64"] * n_in + ["u32"] * len(launch.extras) + ["u64"] * n_out
    norm = ["u32" if t in ("u32", "s32", "b32") else t for t in types]
    assert norm == expect, f"{launch.kernel}: {types}"
    assert all(isinstance(e, int) and -2**31 <= e < 2**31 for e in launch.extras)


def test_shared_memory_form_refuses_slices_over_48_kb():
    """A TensorRT AOT launch cannot raise the dynamic shared-memory limit, so the plan must refuse the staged
    form where a (batch, head) value slice exceeds 48 KB (BEVFormer's 50x50 maps) and take it where it fits."""
    with pytest.raises(ValueError, match="48 KB"):
        tp.msda_launch("fp16", (1, 2500, 8, 32), 1, 2, 4, 900, form="smem")
    fits = tp.msda_launch("fp32", (6, 375, 8, 32), 1, 8, 8, 2500, form="smem")
    assert fits.kernel == "msda_smem_lp8_fp32_v8" and fits.shared_mem == 375 * 32 * 4
    # the cooperative D = 32 kernels for calls with enough (b, q, m) groups, by PyTorch's rule
    assert tp.msda_launch("fp16", (2, 2500, 8, 32), 1, 2, 4, 2500).kernel == "msda_co_lp4_fp16"
    assert tp.msda_launch("fp16", (1, 2500, 8, 32), 1, 2, 4, 900).kernel == "msda_lp4_fp16_v8"
    assert tp.msda_launch("fp16", (2, 2500, 8, 16), 1, 2, 4, 2500).kernel == "msda_lp4_fp16_v8"


def test_trt_plugin_keeps_the_cooperative_kernel_where_pytorch_packs():
    """An AOT plugin launches one kernel and has no workspace, so the packed form (copy + gather) is PyTorch's only:
    where use_packed picks it for PyTorch, the plugin plan must still name the cooperative kernel, and no plan may
    name a packed-form kernel."""
    from qdqkit.custom_ops import cuda

    assert cuda.use_packed("int8", 32, 1, 8, 6 * 2500 * 8)
    for dtype, scales in (("fp16", ()), ("int8", (0.1, 0.2, 0.3, 0.4))):
        launch = tp.msda_launch(dtype, (6, 375, 8, 32), 1, 8, 8, 2500, scales=scales)
        assert launch.kernel == f"msda_co_lp8_{dtype}"
    assert not cuda.use_packed("fp32", 32, 1, 8, 6 * 2500 * 8)
    assert not cuda.use_packed("int8", 32, 1, 8, 1000)  # too few groups: not even the cooperative kernels
    assert not cuda.use_packed("fp16", 32, 1, 8, 6 * 2500 * 8)  # fp16 keeps the cooperative kernel (R14)
