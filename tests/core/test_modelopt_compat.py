"""One test per ModelOpt behaviour qdqkit patches or works around (qdqkit/modelopt_compat.py).

Each "still broken upstream" test documents the defect in the installed ModelOpt: when a release fixes it, that
test fails, telling us the patch can go.
"""

from __future__ import annotations

import os

import onnx
import pytest
from onnx import TensorProto, helper

from qdqkit import modelopt_compat

pytest.importorskip("modelopt.onnx.quantization")


def _two_plugin_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("OpA", ["x"], ["a"], name="a", domain="trt.plugins"),
             helper.make_node("OpB", ["a"], ["y"], name="b", domain="trt.plugins")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt.plugins", 1)])


def test_version_is_the_tested_one():
    assert modelopt_compat.check_version().startswith(modelopt_compat.TESTED_VERSION + ".")


def test_precision_flags_of_several_plugins_still_overwrite_upstream():
    from modelopt.onnx.trt_utils import interpret_trt_plugins_precision_flag

    cast, _ = interpret_trt_plugins_precision_flag(_two_plugin_model(), ["OpA:fp32", "OpB:fp32"])
    assert list(cast["fp32"]) == ["OpB"]  # OpA lost: the defect the patch works around


def test_patched_precision_flags_keep_every_plugin():
    import importlib

    # the package re-exports a function named `quantize`, which hides the submodule of that name
    q_mod = importlib.import_module("modelopt.onnx.quantization.quantize")
    gs_mod = importlib.import_module("modelopt.onnx.autocast.graphsanitizer")

    flags = ["OpA:fp32", "OpB:fp32", "OpA:[fp16]:[fp16]"]
    with modelopt_compat.patched_modelopt():
        for mod in (q_mod, gs_mod):
            cast, quant = mod.interpret_trt_plugins_precision_flag(_two_plugin_model(), flags[:2])
            assert sorted(cast["fp32"]) == ["OpA", "OpB"] and quant == {}
        cast, _ = q_mod.interpret_trt_plugins_precision_flag(
            _two_plugin_model(), ["OpA:[int8]:[fp32]", "OpB:[fp16]:[fp16]"])
        assert list(cast["fp16"]) == ["OpB"]
    # restored afterwards
    assert not hasattr(q_mod.interpret_trt_plugins_precision_flag, "qdqkit_original")


@pytest.mark.skipif(modelopt_compat.tensorrt_available(), reason="the defect only shows without TensorRT")
def test_autocast_custom_node_discovery_still_needs_tensorrt_upstream():
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer

    with pytest.raises(NameError, match="trt"):
        GraphSanitizer(_two_plugin_model()).find_custom_nodes()


@pytest.mark.skipif(modelopt_compat.tensorrt_available(), reason="the patch is only installed without TensorRT")
def test_patched_custom_node_discovery_works_without_tensorrt():
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer

    m = _two_plugin_model()
    for n in m.graph.node:
        n.domain = ""
    with modelopt_compat.patched_modelopt():
        s = GraphSanitizer(m)
        s.find_custom_nodes()
    assert s.custom_ops == {"OpA", "OpB"}
    assert all(n.domain == "trt.plugins" for n in s.model.graph.node)
    assert any(o.domain == "trt.plugins" for o in s.model.opset_import)


def test_private_dir_is_the_cwd_and_disappears(tmp_path):
    before = os.getcwd()
    with modelopt_compat.run_in_private_dir(tmp_path) as d:
        assert os.getcwd() == str(d)
        (d / "sym_shape_infer_temp.onnx").write_bytes(b"junk")
    assert os.getcwd() == before and not d.exists() and list(tmp_path.iterdir()) == []


def test_onnxruntime_quantization_is_restored_after_modelopt():
    from modelopt.onnx.quantization.ort_patching import patch_ort_modules
    from onnxruntime.quantization.calibrate import CalibraterBase, MinMaxCalibrater

    before = (CalibraterBase.__init__, MinMaxCalibrater.collect_data)
    with modelopt_compat.patched_modelopt():
        patch_ort_modules()  # what every ModelOpt quantize() call does, for good
        assert MinMaxCalibrater.collect_data is not before[1]
    assert (CalibraterBase.__init__, MinMaxCalibrater.collect_data) == before


def test_onnxruntime_op_registries_are_restored_after_modelopt():
    from modelopt.onnx.quantization.ort_utils import configure_ort
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    before = dict(QDQRegistry), dict(QLinearOpsRegistry)
    with modelopt_compat.patched_modelopt():
        # what a ModelOpt quantize() call with an INT8 plugin does, for good: the plugin registered as quantizable,
        # Relu and Concat no longer
        configure_ort(["Conv", "MyPluginTRT"], [], calibration_eps=["cpu"], custom_ops_to_quantize=["MyPluginTRT"])
        assert "MyPluginTRT" in QDQRegistry and "Relu" not in QLinearOpsRegistry
    assert (dict(QDQRegistry), dict(QLinearOpsRegistry)) == before
    assert "MyPluginTRT" not in QDQRegistry and "Relu" in QLinearOpsRegistry


def _conv_mlp_model() -> onnx.ModelProto:
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(3)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype("float32") * 0.2, name)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 32])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w1b"], ["c1b"], name="conv1b", pads=[1, 1, 1, 1]),
        # a quantized tensor into a quantized Concat: ModelOpt gives both one range (its group_qdq_tensors)
        helper.make_node("Concat", ["r1", "c1b"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c2", "shape"], ["t"], name="flatten"),
        # a constant sub-graph: what folding removes (the custom ops' function kernels are full of these)
        helper.make_node("Mul", ["m", "two"], ["m2"], name="const_mul"),
        helper.make_node("MatMul", ["t", "m2"], ["y"], name="mm"),
    ]
    inits = [init("w1", 16, 8, 3, 3), init("w1b", 16, 16, 3, 3), init("w2", 64, 32, 3, 3), init("m", 256, 32),
             numpy_helper.from_array(np.array([1, 64, 256], dtype="int64"), "shape"),
             numpy_helper.from_array(np.array(2.0, dtype="float32"), "two")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


_SAMPLES = 8


def _residual_model() -> onnx.ModelProto:
    """Two residual blocks' worth of a ResNet: ModelOpt's placement quantizes the Add's residual input and marks its
    other input (the Conv the Add fuses into) for Q/DQ removal after the quantizer has run."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 16, 16])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype("float32") * 0.1, f"w{i}")
             for i in (1, 2, 3)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def _quantize_recording(tmp_path, fold: bool, running: bool, external: bool = False, method: str = "max",
                        direct: bool = False, shrinking: bool = False, read_only: bool = False,
                        model=_conv_mlp_model, reader=None, high: str = "fp32", probes: bool = True,
                        blocked: bool = False) -> dict:
    """Quantize the test model with the given patches (``probes``: patch 9, ``blocked``: patch 11, which changes
    the kernels the observed tensors come from, so it is off where a test compares with ModelOpt bit for bit);
    record what the calibration did. The
    samples are scaled up one after the other (every sample widens the ranges), or down with ``shrinking``; they go
    to ModelOpt as arrays, or through a reader of the class ``reader``."""
    import weakref

    import numpy as np
    import onnxruntime as ort
    from modelopt.onnx.quantization import ort_patching, quantize
    from onnx import numpy_helper
    from onnxruntime.quantization.calibrate import HistogramCollector

    tmp_path.mkdir(parents=True, exist_ok=True)
    rec: dict = {"levels": [], "arena": [], "fetched": [], "compute_data": 0, "groups": None, "histograms": None,
                 "collect_value": None, "alive": [], "refs": []}
    original_init, original_run = ort.InferenceSession.__init__, ort.InferenceSession.run
    original_compute = ort_patching._compute_data_minmax_calibrator
    original_result = HistogramCollector.compute_collection_result

    def spy_init(self, path_or_bytes, sess_options=None, *a, **k):
        rec["levels"].append(None if sess_options is None else sess_options.graph_optimization_level)
        rec["arena"].append(None if sess_options is None else sess_options.enable_cpu_mem_arena)
        original_init(self, path_or_bytes, sess_options, *a, **k)

    def spy_run(self, output_names, *a, **k):
        if any(o.name.endswith("_ReduceMax") or o.name.startswith("qdqkit_minmax_") for o in self.get_outputs()):
            rec["fetched"].append(None if output_names is None else list(output_names))
        # how many of the arrays the previous run returned are still held as this one starts
        rec["alive"].append(sum(r() is not None for r in rec["refs"]))
        outputs = original_run(self, output_names, *a, **k)
        rec["refs"] = [weakref.ref(x) for x in outputs if isinstance(x, np.ndarray)]
        return outputs

    def spy_compute(calibrator):
        rec["compute_data"] += 1
        rec["groups"] = calibrator.group_qdq_tensors
        return original_compute(calibrator)

    def spy_result(collector):
        # the histograms every sample went into, and the collector that built them
        rec["histograms"] = {k: tuple(v) for k, v in collector.histogram_dict.items()}
        rec["collect_value"] = type(collector).collect_value
        return original_result(collector)

    # innermost: sees the options as onnxruntime will get them; ModelOpt installs the compute_data it finds here
    ort.InferenceSession.__init__, ort.InferenceSession.run = spy_init, spy_run
    ort_patching._compute_data_minmax_calibrator = spy_compute
    HistogramCollector.compute_collection_result = spy_result
    try:
        with modelopt_compat.patched_modelopt(fold_constants=fold, running_ranges=running,
                                              direct_histograms=direct, read_ranges_only=read_only,
                                              shape_probes=probes, blocked_fetch=blocked) as notes, \
                modelopt_compat.run_in_private_dir(tmp_path) as d:
            proto = model()
            onnx.save(proto, d / "m.onnx")
            shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
            data = np.random.default_rng(0).standard_normal((_SAMPLES, *shape[1:])).astype("float32")
            scale = np.linspace(0.5, 2.0, _SAMPLES, dtype="float32")  # every sample counts
            data *= (scale[::-1] if shrinking else scale)[:, None, None, None]
            feed = {"calibration_data_reader": reader(data)} if reader else {"calibration_data": {"x": data}}
            quantize(onnx_path=str(d / "m.onnx"), quantize_mode="int8", **feed,
                     calibration_method=method, calibration_eps=["cpu"], high_precision_dtype=high,
                     dq_only=False, output_path=str(d / "q.onnx"), log_level="ERROR",
                     use_external_data_format=external)
            q = onnx.load(str(d / "q.onnx"))
    finally:
        ort.InferenceSession.__init__, ort.InferenceSession.run = original_init, original_run
        ort_patching._compute_data_minmax_calibrator = original_compute
        HistogramCollector.compute_collection_result = original_result
    rec["scales"] = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if "scale" in i.name}
    rec["model"] = q
    rec["notes"] = notes.lines()
    return rec


class _Once:
    """A calibration data reader over the samples of one input ``x`` that cannot start again."""

    def __init__(self, data) -> None:
        self.data, self.i = data, 0

    def get_next(self):
        if self.i == len(self.data):
            return None
        self.i += 1
        return {"x": self.data[self.i - 1:self.i]}


class _Rewinding(_Once):
    """The same, able to start again."""

    def rewind(self) -> None:
        self.i = 0


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """ModelOpt's own calibration path, every calibration patch off."""
    return _quantize_recording(tmp_path_factory.mktemp("upstream"), fold=False, running=False, probes=False)


def _assert_same_scales(got: dict, want: dict) -> None:
    import numpy as np

    assert got.keys() == want.keys() and len(got) >= 4
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_calibration_sessions_run_unoptimized_upstream_and_folded_when_patched(tmp_path, upstream):
    import onnxruntime as ort

    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # ModelOpt still switches every optimization and the arena off: patch 4 still has work to do
    assert off in upstream["levels"] and False in upstream["arena"]
    rec = _quantize_recording(tmp_path, fold=True, running=False)
    assert off not in rec["levels"] and ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED in rec["levels"]
    assert False not in rec["arena"]
    # the observed ranges, hence every scale ModelOpt writes, are the same with constant folding
    _assert_same_scales(rec["scales"], upstream["scales"])


def test_max_calibration_merges_ranges_per_sample_upstream_and_keeps_running_ones_when_patched(tmp_path, upstream):
    # ModelOpt fetches every output and merges the ranges in Python after each sample: patch 5 has work to do
    assert upstream["compute_data"] == _SAMPLES + 1 and upstream["fetched"] == [None] * _SAMPLES
    assert upstream["groups"]  # the Concat's inputs share one range: that merge is exercised too
    rec = _quantize_recording(tmp_path, fold=False, running=True)
    # one merge over the running minima and maxima (plus ModelOpt's final call); only the reductions fetched,
    # gathered into one output per rank
    assert rec["compute_data"] == 2 and len(rec["fetched"]) == _SAMPLES
    assert all(f and all(n.startswith("qdqkit_minmax_") for n in f) for f in rec["fetched"])
    assert 1 <= len(rec["fetched"][0]) <= 3  # the observed tensors are of rank 2 to 4, all float
    _assert_same_scales(rec["scales"], upstream["scales"])


def test_calibration_as_shipped_gives_modelopts_scales(tmp_path, upstream):
    rec = _quantize_recording(tmp_path, fold=True, running=True)
    _assert_same_scales(rec["scales"], upstream["scales"])


def test_max_calibration_with_external_data_keeps_one_output_per_reduction(tmp_path, upstream):
    # a model saved with external data cannot be re-saved after augmentation: the running ranges alone
    rec = _quantize_recording(tmp_path, fold=True, running=True, external=True)
    assert rec["compute_data"] == 2 and len(rec["fetched"]) == _SAMPLES
    assert all(f and all(n.endswith(("_ReduceMin", "_ReduceMax")) for n in f) for f in rec["fetched"])
    _assert_same_scales(rec["scales"], upstream["scales"])


def _onnxruntime_minmax_ranges(tmp_path, patched: bool) -> tuple:
    """onnxruntime's own MinMaxCalibrater over a model observed in float32 and float16, with patch 5's augmenter and
    collector or with its own; the ranges, and the gathered outputs (patched only)."""
    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.quantization.calibrate import CalibrationDataReader, MinMaxCalibrater

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Cast", ["r"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["h", "k"], ["m"]),
             # a scalar (rank 0) observed too: its reduction cannot be concatenated with others
             helper.make_node("ReduceMax", ["m"], ["s"], keepdims=0),
             helper.make_node("Sub", ["m", "s"], ["d"]),
             helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)]
    k = numpy_helper.from_array(np.array(-1.5, dtype=np.float16), "k")
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [k]),
                                opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(5)
            self.samples = iter([{"x": rng.standard_normal((1, 4, 8)).astype(np.float32) * s} for s in (1, 3, 2)])

        def get_next(self):
            return next(self.samples, None)

    cal = MinMaxCalibrater(str(tmp_path / "m.onnx"), augmented_model_path=str(tmp_path / "aug.onnx"))
    augment, collect = MinMaxCalibrater.augment_graph, MinMaxCalibrater.collect_data
    if patched:
        augment = modelopt_compat._gathering_augmenter(augment)
        collect = modelopt_compat._running_minmax_collector(collect)
    augment(cal)
    cal.create_inference_session()
    collect(cal, Reader())
    return cal.compute_data().data, getattr(cal, "qdqkit_gathered", None)


def test_running_ranges_of_float32_and_float16_outputs_are_onnxruntimes(tmp_path):
    import numpy as np

    (tmp_path / "own").mkdir()
    (tmp_path / "patched").mkdir()
    want, _ = _onnxruntime_minmax_ranges(tmp_path / "own", patched=False)
    got, gathered = _onnxruntime_minmax_ranges(tmp_path / "patched", patched=True)
    assert want["h"].range_value[0].dtype == np.float16  # onnxruntime observes the float16 tensors too
    # one gathered output per element type: a running range per output of its own dtype
    assert gathered is not None and {g.rsplit("_", 1)[1] for g, _ in gathered} == \
        {str(TensorProto.FLOAT), str(TensorProto.FLOAT16)}
    assert got.keys() == want.keys() and {"x", "r", "h", "m", "s", "y"} <= set(got)
    for name in want:
        for mine, theirs in zip(got[name].range_value, want[name].range_value):
            assert mine.dtype == theirs.dtype, name
            np.testing.assert_array_equal(mine, theirs, err_msg=name)


# -- patch 6: histograms without copies ---------------------------------------------------------------------------

def _edge_heavy_data(dtype, n: int, seed: int):
    """Normal data plus every bin edge of a 128-bin histogram over its range and the floats on either side of
    each: the values where numpy's bin guess needs its corrections."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * 2.5).astype(dtype)
    t = float(np.max(np.abs(a)))
    edges = np.histogram(a[:0], 128, range=(-t, t))[1].astype(dtype)
    near = np.concatenate([np.nextafter(edges, -np.inf), edges, np.nextafter(edges, np.inf)]).astype(dtype)
    a[rng.choice(n, near.size, replace=False)] = near
    return a


class _CountingNative:
    """The compiled module, counting the pieces it histogrammed (so a test knows which path ran)."""

    def __init__(self, native) -> None:
        self.native, self.pieces = native, 0

    def counts(self, *args):
        done = self.native.counts(*args)
        self.pieces += bool(done)
        return done


def _native_at(level: str):
    """The compiled module (qdqkit/_histogram.c) set to run at ``level`` ("avx512" where the processor has it, or
    "scalar"); a generator that puts the level back. CI builds the module, elsewhere it may be missing."""
    if modelopt_compat._NATIVE is None:
        if os.environ.get("CI"):
            pytest.fail("qdqkit._histogram was not built (pip install -e . compiles it; is gcc missing?)")
        pytest.skip("qdqkit._histogram is not built here (no C compiler at install time)")
    native = modelopt_compat._NATIVE
    if level not in native.simd_levels():
        pytest.skip(f"this processor has no {level}")
    before = native.simd()
    native.simd(level)
    try:
        yield native
    finally:  # also when the test fails, or a caller's loop breaks off
        native.simd(before)


@pytest.fixture(params=["avx512", "scalar"])
def native(request):
    """The compiled module at each of its levels."""
    yield from _native_at(request.param)


@pytest.fixture(params=["avx512", "scalar", "numpy"])
def histogram_path(request, monkeypatch):
    """Patch 6 with its compiled passes (at each level) and with its numpy code alone."""
    if request.param == "numpy":
        monkeypatch.setattr(modelopt_compat, "_NATIVE", None)
        yield None
        return
    for native in _native_at(request.param):
        counting = _CountingNative(native)
        monkeypatch.setattr(modelopt_compat, "_NATIVE", counting)
        yield counting


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_histogram_pieces_are_numpys_bin_for_bin(dtype, monkeypatch, histogram_path):
    import numpy as np

    monkeypatch.setattr(modelopt_compat, "_BLOCK", 4096)  # many blocks in the large pieces
    a = _edge_heavy_data(dtype, 40_000, seed=1)
    b = _edge_heavy_data(dtype, 9_000, seed=2)
    whole = np.concatenate([a, b])
    t = np.max(np.abs(whole))
    ranges = [(-float(t), float(t)),  # ModelOpt's first histogram: Python floats, quotient in float64
              (-t, t),  # onnxruntime's merge: thresholds of the data's dtype
              (-t * t.dtype.type(0.75), t * t.dtype.type(0.75)),  # data outside the range: numpy's mask
              (-t * t.dtype.type(1.25), t * t.dtype.type(1.25)),
              (0.0, 0.0)]  # an empty range, widened by numpy
    bin_counts = (128, 2048, 1001) if dtype == "float32" else (128, 250)  # float16: few distinct edges
    # large pieces (blockwise), and small ones (under a block, over the compiled code's minimum: counted compiled,
    # or by np.histogram where the compiled code does not count them)
    for pieces in ((a, b), (a[:2000], b[:1500])):
        whole = np.concatenate(pieces)
        for range_ in ranges:
            for bins in bin_counts:
                want = np.histogram(whole, bins, range=range_)
                got = modelopt_compat._uniform_histogram(list(pieces), bins, range_,
                                                         [(p.min(), p.max()) for p in pieces])
                np.testing.assert_array_equal(got[0], want[0], err_msg=f"{range_} {bins} {len(whole)}")
                assert got[1].dtype == want[1].dtype and np.array_equal(got[1], want[1])
    with_nan = a.copy()
    with_nan[7] = np.nan  # compared with the range element by element, as numpy does
    got = modelopt_compat._uniform_histogram([with_nan], 128, (-1.0, 1.0), [(np.min(with_nan), np.max(with_nan))])
    np.testing.assert_array_equal(got[0], np.histogram(with_nan, 128, range=(-1.0, 1.0))[0])
    if histogram_path is not None and dtype != "float16":  # float16 data has no compiled variant
        # the ranges that hold all the data ran compiled (the first, second and fourth), at every bin count, both
        # pieces, large and small; the others need numpy's mask
        assert histogram_path.pieces == 2 * 3 * len(bin_counts) * 2


def test_compiled_counts_decline_what_they_cannot_place_and_leave_the_counts(native):
    """Data outside the range (which the caller masks first) gives guesses past the bins: the compiled counts
    return False and add nothing, so the caller's numpy code runs instead."""
    import numpy as np

    for edge_dtype, modes in ((np.float64, (True, True)), (np.float32, (False, False)), (np.float32, (False, True))):
        edges = np.linspace(-1.0, 1.0, 129).astype(edge_dtype)
        hist = np.zeros(128, np.int64)
        for x in ([0.5, 3.0], [0.5, -3.0], [np.nan], [0.25] * 37 + [np.nan], [0.25] * 40 + [-1.5] + [0.5] * 3):
            assert native.counts(np.array(x, np.float32), edges, -1.0, 2.0, 128, *modes, hist) is False, x
        assert not hist.any()
        ends = np.array([-1.0, 0.0, 1.0], np.float32)
        assert native.counts(ends, edges, -1.0, 2.0, 128, *modes, hist) is True
        assert hist[0] == hist[64] == hist[127] == 1 and hist.sum() == 3
    with pytest.raises(ValueError):  # lengths that do not match are a caller's bug, not a fallback
        native.counts(np.zeros(3, np.float32), edges[:-1], -1.0, 2.0, 128, True, True, hist)


def _native_args(edges, range_: tuple, bins: int) -> tuple:
    """(first, denom, shifted_double, quotient_double) as patch 6 hands them to the compiled counts for numpy's
    histogram of ``bins`` over ``range_`` with these edges."""
    import numpy as np

    denom = np.subtract(range_[1], range_[0])
    modes = modelopt_compat._native_modes(edges.dtype, modelopt_compat._estimate_buffers(
        edges.dtype, range_[0], denom, bins), denom)
    return (float(range_[0]), float(denom), *modes)


@pytest.mark.parametrize("quotient_double", [False, True])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 4099])
def test_compiled_counts_are_numpys_where_edges_are_far_from_their_guesses(native, n, quotient_double):
    """200 bins one float32 apart (1e7 + k): the float just below an edge lies a whole bin below it, so no bound
    on the guesses holds and every element is compared with its edges, and some of the guesses (k / 200 * 200
    rounded) are a bin low. Lengths around the vector width cover the partial last vector."""
    import numpy as np

    bins = 200
    lo, hi = np.float32(1e7), np.float32(1e7 + bins)
    x = np.arange(float(lo), float(hi) + 1, dtype=np.float32)  # every edge
    x = np.resize(np.random.default_rng(n).permutation(x), n)
    range_ = (lo, hi) if not quotient_double else (float(lo), float(hi))  # numpy scalars or Python floats
    want, edges = np.histogram(x, bins, range=range_)
    args = _native_args(edges, range_, bins)
    assert args[2:] == (False, quotient_double)
    guesses = np.minimum((((x - range_[0]) / np.subtract(range_[1], range_[0])) * bins).astype(np.intp), bins - 1)
    assert n < bins or np.any(guesses != np.searchsorted(edges, x, side="right").clip(1, bins) - 1)
    hist = np.zeros(bins, np.int64)
    assert native.counts(x, edges, *args[:2], bins, *args[2:], hist) is True
    np.testing.assert_array_equal(hist, want)


@pytest.mark.parametrize("bins", [1, 2, 127, 128, 2048, 100_003])
def test_compiled_counts_take_the_product_guess_and_stay_numpys(native, bins):
    """ModelOpt's first histograms (a Python-float range: numpy's quotient in float64) and its merges (a float32
    range): the AVX-512 pass guesses with a float32 product instead of numpy's division wherever both guesses are
    bounded, which is every such range here. Every edge, the floats either side of it and values in between are
    counted as numpy counts them. Edges one float apart leave the product guess without bounds."""
    import numpy as np

    rng = np.random.default_rng(bins)
    t = np.float32(3.7)
    for range_ in ((-float(t), float(t)), (-t, t), (0.0, float(t))):
        edges = np.histogram(np.zeros(0, np.float32), bins, range=range_)[1]
        assert native.product_bounds(edges) is not None, range_
        at = edges[rng.integers(0, bins + 1, 3000)]
        x = np.concatenate([at, np.nextafter(at, np.float32(np.inf)), np.nextafter(at, np.float32(-np.inf)),
                            rng.uniform(range_[0], range_[1], 3000).astype(np.float32)])
        x = rng.permutation(np.clip(x, edges[0], edges[-1]))
        want = np.histogram(x, bins, range=range_)[0]
        args = _native_args(edges, range_, bins)
        hist = np.zeros(bins, np.int64)
        assert native.counts(x, edges, *args[:2], bins, *args[2:], hist) is True, range_
        np.testing.assert_array_equal(hist, want, err_msg=str(range_))
        if native.simd() == "avx512":
            hist[:] = 0
            assert native.counts_extremes(x, edges, *args[:2], bins, *args[2:], hist)[0] is True
            np.testing.assert_array_equal(hist, want, err_msg=str(range_))
    lo = np.float32(1e7)
    assert native.product_bounds(np.histogram(np.zeros(0, np.float32), 200, range=(lo, lo + 200))[1]) is None


@pytest.mark.parametrize("bins", [128, 127])
def test_compiled_counts_place_zeros_as_numpy(native, bins):
    """A tensor after a ReLU: half zeros (and some negative zeros), on the middle edge of a symmetric range with an
    even bin count (inside a bin with an odd one), and on the lowest edge of a range that starts at zero."""
    import numpy as np

    rng = np.random.default_rng(bins)
    x = np.maximum(rng.standard_normal(50_001).astype(np.float32), 0)
    x[rng.choice(x.size, 500, replace=False)] = np.float32(-0.0)
    t = np.max(x)
    for range_ in ((-float(t), float(t)), (-t, t), (np.float32(0), t), (0.0, float(t))):
        want, edges = np.histogram(x, bins, range=range_)
        args = _native_args(edges, range_, bins)
        hist = np.zeros(bins, np.int64)
        assert native.counts(x, edges, *args[:2], bins, *args[2:], hist) is True, range_
        np.testing.assert_array_equal(hist, want, err_msg=str(range_))


def test_compiled_counts_extremes_are_numpys(native):
    """The fused pass: the counts of counts(), and the minimum and maximum wherever they sit (every lane of a
    vector, the partial last one); where counts() declines, counts untouched and the extremes still the whole
    data's (NaN where it holds one); None at the scalar level."""
    import numpy as np

    rng = np.random.default_rng(5)
    t = np.float32(1)
    hist0, edges = np.histogram(np.zeros(0, np.float32), 128, range=(-t, t))
    for n in (1, 15, 16, 17, 40, 1001):
        for at in sorted({0, n - 1, *range(0, n, max(1, n // 37))}):
            x = rng.uniform(-0.5, 0.5, n).astype(np.float32)
            x[at], x[(at + 7) % n] = np.float32(0.875), np.float32(-0.75)
            hist = np.zeros(128, np.int64)
            found = native.counts_extremes(x, edges, -1.0, 2.0, 128, False, False, hist)
            if native.simd() == "scalar":
                assert found is None and not hist.any()
                return
            assert found == (True, float(np.min(x)), float(np.max(x))), (n, at)
            assert n == 1 or found[1:] == (-0.75, 0.875)
            np.testing.assert_array_equal(hist, np.histogram(x, 128, range=(-t, t))[0])
    for bad, at in ((np.nan, 20), (np.inf, 20), (-np.inf, 3), (np.float32(1.5), 20), (np.float32(-3), 0)):
        for after in (np.float32(0.25), np.float32(2.5), np.float32(-4)):  # the extremes after the element
            x = np.zeros(1001, np.float32)
            x[at], x[700] = bad, after
            hist = np.zeros(128, np.int64)
            placed, lo, hi = native.counts_extremes(x, edges, -1.0, 2.0, 128, False, False, hist)
            assert placed is False and not hist.any()
            if np.isnan(bad):
                assert np.isnan(lo) and np.isnan(hi)
            else:
                assert (lo, hi) == (float(np.min(x)), float(np.max(x))), (bad, after)
    # a value just above the top edge still guesses the last bin: placed, and its maximum says it is outside
    x = np.array([0.5, np.nextafter(t, np.float32(2))], np.float32)
    assert native.counts_extremes(x, edges, -1.0, 2.0, 128, False, False, np.zeros(128, np.int64))[2] > t


def test_merge_counted_in_one_pass_is_kept_only_inside_the_old_range(monkeypatch):
    """A sample whose maximum lies one float above the first sample's: the fused pass places it (it guesses the
    last bin) but the merge must widen the range, as onnxruntime's does; and one with a value far outside, which
    the fused pass cannot place (its extremes are used). Every collector entry equals ModelOpt's own collector's,
    sample after sample."""
    import numpy as np
    from modelopt.onnx.quantization import ort_patching
    from onnxruntime.quantization.calibrate import HistogramCollector

    monkeypatch.setattr(modelopt_compat, "_BLOCK", 256)
    rng = np.random.default_rng(9)
    first = rng.standard_normal(4096).astype(np.float32)
    t = np.max(np.abs(first))
    inside, above = first * np.float32(0.5), first * np.float32(0.5)
    above[100] = np.nextafter(t, np.float32(np.inf))
    counted = modelopt_compat._counted_within
    kept_or_not: list = []
    monkeypatch.setattr(modelopt_compat, "_counted_within",
                        lambda old, pieces: kept_or_not.append(counted(old, pieces)) or kept_or_not[-1])
    patched = modelopt_compat._direct_value_collector(ort_patching._collect_value, HistogramCollector.merge_histogram)
    collectors = [HistogramCollector("entropy", True, 128, 128, 99.999, "same") for _ in range(2)]
    outside = inside.copy()
    outside[4000] = t * np.float32(1.5)  # a merge that widens the range, its extremes from the fused pass
    for sample in (first, inside, above, inside, outside, inside):
        patched(collectors[0], {"x": [sample]})
        ort_patching._collect_value(collectors[1], {"x": [sample]})
        _assert_same_histograms_of(collectors[0].histogram_dict, collectors[1].histogram_dict)
    if "avx512" in modelopt_compat._NATIVE.simd_levels() if modelopt_compat._NATIVE else False:
        # placed: the second, third (kept, not kept) and fourth sample; not placed: the fifth; then placed again
        assert [found is not None and found[1] is not None for found in kept_or_not] == [True] * 3 + [False, True]


def test_merged_zero_extremes_have_numpys_sign(native):
    """A first sample of positive values, then samples whose minimum is zero, both zeros present (the new minimum, so
    the sign numpy's reduction gives is kept), and the same mirrored for the maximum: every entry, signs of zero
    included, equals ModelOpt's own collector's (at AVX-512 the merges are counted in the fused pass, whose zero
    has no numpy sign)."""
    import numpy as np
    from modelopt.onnx.quantization import ort_patching
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(11)
    positive = np.abs(rng.standard_normal(4096)).astype(np.float32) + np.float32(0.25)
    for sign in (1, -1):
        samples = [sign * positive]
        for zero in (-0.0, 0.0):
            sample = sign * positive * np.float32(0.5)
            # both zeros, at places where the fused pass's lanes and numpy's reduction disagree on which one is the
            # minimum (found by trying pairs of places)
            sample[0], sample[1] = np.float32(zero), np.float32(-zero)
            samples.append(sample)
        patched = modelopt_compat._direct_value_collector(ort_patching._collect_value,
                                                          HistogramCollector.merge_histogram)
        collectors = [HistogramCollector("entropy", True, 128, 128, 99.999, "same") for _ in range(2)]
        for sample in samples:
            patched(collectors[0], {"x": [sample]})
            ort_patching._collect_value(collectors[1], {"x": [sample]})
            _assert_same_histograms_of(collectors[0].histogram_dict, collectors[1].histogram_dict)


def _assert_same_histograms(got: dict, want: dict) -> None:
    assert len(got) >= 4
    _assert_same_histograms_of(got, want)


def _assert_same_histograms_of(got: dict, want: dict) -> None:
    import numpy as np

    assert got.keys() == want.keys()
    for name, entry in got.items():
        assert len(entry) == len(want[name]) == 5, name
        for mine, theirs in zip(entry, want[name]):
            mine, theirs = np.asarray(mine), np.asarray(theirs)
            assert mine.dtype == theirs.dtype, name
            np.testing.assert_array_equal(mine, theirs, err_msg=name)
            if mine.dtype.kind == "f":  # assert_array_equal takes -0 for +0
                np.testing.assert_array_equal(np.signbit(mine), np.signbit(theirs), err_msg=name)


@pytest.fixture(scope="module")
def upstream_entropy(tmp_path_factory):
    """ModelOpt's own entropy calibration, every calibration patch off."""
    return _quantize_recording(tmp_path_factory.mktemp("upstream_entropy"), fold=False, running=False,
                               method="entropy", probes=False)


def _spy_patch6(monkeypatch) -> dict:
    """Counts of what patch 6 did: histograms it built (pieces each), merges it counted in one fused pass, and
    tensors it handed back to ModelOpt's own collector (ModelOpt's function, wrapped before the patch takes it)."""
    from modelopt.onnx.quantization import ort_patching

    seen: dict = {"built": [], "fused": 0, "handed_back": 0}
    uniform, counted, original = (modelopt_compat._uniform_histogram, modelopt_compat._counted_within,
                                  ort_patching._collect_value)

    def spy_uniform(pieces, *args):
        seen["built"].append(len(pieces))
        return uniform(pieces, *args)

    def spy_counted(old, pieces):
        found = counted(old, pieces)
        seen["fused"] += found is not None
        return found

    def spy_original(collector, name_to_arr):
        seen["handed_back"] += len(name_to_arr)
        return original(collector, name_to_arr)

    monkeypatch.setattr(modelopt_compat, "_BLOCK", 256)  # the test model's tensors through the blockwise path
    monkeypatch.setattr(modelopt_compat, "_uniform_histogram", spy_uniform)
    monkeypatch.setattr(modelopt_compat, "_counted_within", spy_counted)
    monkeypatch.setattr(ort_patching, "_collect_value", spy_original)
    seen["original"] = spy_original
    return seen


def test_entropy_histograms_copy_every_tensor_upstream_and_not_when_patched(tmp_path, upstream_entropy,
                                                                           monkeypatch):
    from modelopt.onnx.quantization import ort_patching

    # ModelOpt's own collector (flattening and concatenating copies) builds the histograms upstream
    assert upstream_entropy["collect_value"] is ort_patching._collect_value
    seen = _spy_patch6(monkeypatch)
    rec = _quantize_recording(tmp_path, fold=False, running=False, method="entropy", direct=True)
    assert getattr(rec["collect_value"], "qdqkit_original", None) is seen["original"]
    # every tensor of every sample went through patch 6 (none handed back to ModelOpt's code), groups included:
    # otherwise the comparison below would only test ModelOpt against itself
    assert seen["handed_back"] == 0 and len(seen["built"]) >= len(rec["histograms"]) and max(seen["built"]) > 1
    monkeypatch.undo()
    assert ort_patching._collect_value is upstream_entropy["collect_value"]  # restored
    # every sample's histogram, its edges, extremes and threshold; the tensors a Concat groups included
    _assert_same_histograms(rec["histograms"], upstream_entropy["histograms"])
    _assert_same_scales(rec["scales"], upstream_entropy["scales"])


@pytest.mark.parametrize("level", ["avx512", "scalar"])
def test_entropy_histograms_merged_in_one_pass_are_modelopts(tmp_path, level, monkeypatch):
    """Samples scaled down one after the other: from the second on, the merges keep the old range, and (with
    AVX-512) patch 6 counts them over it with the extremes in the same pass; the histograms and scales are
    ModelOpt's. At the scalar level there is no fused pass and every histogram is built after numpy's extremes."""
    (tmp_path / "upstream").mkdir()
    (tmp_path / "patched").mkdir()
    upstream = _quantize_recording(tmp_path / "upstream", fold=False, running=False, method="entropy",
                                   shrinking=True, probes=False)
    for _ in _native_at(level):
        seen = _spy_patch6(monkeypatch)
        rec = _quantize_recording(tmp_path / "patched", fold=False, running=False, method="entropy", direct=True,
                                  shrinking=True)
        built, fused = len(seen["built"]), seen["fused"]
        monkeypatch.undo()
    tensors = len(rec["histograms"])
    assert seen["handed_back"] == 0
    if level == "avx512":
        # with these samples every later range holds (a merge whose range grew would be built as well): each
        # tensor's first histogram is built, every merge was counted in the fused pass and kept
        assert built == tensors and fused == tensors * (_SAMPLES - 1)
    else:
        assert fused == 0 and built == tensors * _SAMPLES
    _assert_same_histograms(rec["histograms"], upstream["histograms"])
    _assert_same_scales(rec["scales"], upstream["scales"])


def test_entropy_calibration_holds_a_samples_tensors_into_the_next_run_upstream_and_not_when_patched(
        tmp_path, upstream_entropy):
    from modelopt.onnx.quantization import ort_patching

    # upstream, the loop's locals keep every observed tensor of a sample alive while the next sample runs (twice
    # the activations at once, and onnxruntime's arena grows to hold both)
    assert max(upstream_entropy["alive"]) > 0
    # (patch 9 off on both sides: its answered shape probe would be one run fewer)
    rec = _quantize_recording(tmp_path, fold=True, running=True, method="entropy", direct=True, probes=False)
    assert len(rec["alive"]) == len(upstream_entropy["alive"]) >= _SAMPLES and max(rec["alive"]) == 0
    assert getattr(ort_patching._collect_data_histogram_calibrator, "qdqkit_original", None) is None  # restored
    _assert_same_histograms(rec["histograms"], upstream_entropy["histograms"])


def test_entropy_histograms_through_qdqkits_reader_are_modelopts(monkeypatch):
    """Through qdqkit's back end and sample reader, whose arrays live only as long as the sample: an observed
    graph input comes back from onnxruntime over the feed's own memory, so the loop must keep the feed until the
    sample is collected (it did not, once: the input's histograms were built from freed memory)."""
    import contextlib
    import io

    import numpy as np
    from onnxruntime.quantization.calibrate import HistogramCollector

    from qdqkit.calib import ArraySource, SampleReader, model_inputs
    from qdqkit.customops import CustomOpRegistry
    from qdqkit.quant_backends import ModelOptBackend, QuantJob

    model = _conv_mlp_model()
    data = np.random.default_rng(3).standard_normal((_SAMPLES, 8, 16, 16)).astype("float32")
    source = ArraySource({"x": data}, model_inputs(model), "memory")
    original = HistogramCollector.compute_collection_result
    got: dict = {}

    def spy(collector):
        got[len(got)] = {k: tuple(v) for k, v in collector.histogram_dict.items()}
        return original(collector)

    monkeypatch.setattr(HistogramCollector, "compute_collection_result", spy)
    # patch 11 off for both: it applies under patch 7's loop only, and its kernels round differently
    monkeypatch.setattr(modelopt_compat, "calibration_outputs_blocked", lambda: contextlib.nullcontext([]))
    for loop in (True, False):  # patch 7's loop, then ModelOpt's (all else as shipped)
        if not loop:
            monkeypatch.setattr(modelopt_compat, "_releasing_histogram_loop", lambda original: original)
        job = QuantJob(reader=SampleReader(source, 0, _SAMPLES), custom_ops=CustomOpRegistry(),
                       calibration_method="entropy")
        with contextlib.redirect_stdout(io.StringIO()):
            ModelOptBackend().quantize(model, job)
    assert "x" in got[0]  # the graph input is observed
    _assert_same_histograms(got[0], got[1])


def test_entropy_calibration_as_shipped_but_patch_11_gives_modelopts_scales(tmp_path, upstream_entropy):
    rec = _quantize_recording(tmp_path, fold=True, running=True, method="entropy", direct=True)
    _assert_same_histograms(rec["histograms"], upstream_entropy["histograms"])
    _assert_same_scales(rec["scales"], upstream_entropy["scales"])


# -- patch 11: calibration at the full level, observed tensors read in the blocked layout -----------------------

def test_blocked_reads_take_out_only_reorders_that_feed_nothing_order_dependent():
    def reorder(src, dst, channels=32, last=0):
        return helper.make_node("ReorderOutput", [src], [dst], domain="com.microsoft.nchwc", channels=channels,
                                channels_last=last)

    body = helper.make_graph([helper.make_node("Identity", ["o6"], ["i6"])], "body", [],
                             [helper.make_tensor_value_info("i6", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], [f"b{i}"], domain="com.microsoft.nchwc") for i in range(1, 14)]
    nodes += [
        reorder("b1", "o1"),  # taken out: b1 becomes o1, for its other (blocked) reader too
        helper.make_node("Conv", ["b1", "w"], ["b1c"], domain="com.microsoft.nchwc"),
        reorder("b2", "o2", channels=24),  # padded where blocks are 16 channels
        reorder("b3", "o3", last=1),  # channels-last
        reorder("b4", "o4"), helper.make_node("Relu", ["o4"], ["r4"]),  # read by another node
        reorder("b5", "o5"),  # not a graph output, not reduced
        reorder("b6", "o6"), helper.make_node("If", ["c"], ["i6"], then_branch=body, else_branch=body),  # in a body
        reorder("b7", "o7"), reorder("b7", "o7b"),  # one blocked tensor, two outputs: the first only
        # reductions over every axis: taken out, the reductions read the blocked tensor
        reorder("b8", "t8"), helper.make_node("ReduceMin", ["t8"], ["t8_min"], keepdims=1),
        helper.make_node("ReduceMax", ["t8"], ["t8_max"], keepdims=1),
        reorder("b1", "t1"), helper.make_node("ReduceMax", ["t1"], ["t1_max"], keepdims=0),  # b1, now o1
        # reductions that depend on the layout, or another reader beside them: kept
        reorder("b9", "t9"), helper.make_node("ReduceMin", ["t9"], ["t9_min"], axes=[0, 2, 3]),
        reorder("b10", "t10"), helper.make_node("ReduceMin", ["t10", "axes"], ["t10_min"]),
        reorder("b11", "t11"), helper.make_node("ReduceMin", ["t11"], ["t11_min"], noop_with_empty_axes=1),
        reorder("b12", "t12"), helper.make_node("ReduceMin", ["t12"], ["t12_min"]),
        helper.make_node("Relu", ["t12"], ["r12"]),
        reorder("b13", "t13", channels=24), helper.make_node("ReduceMax", ["t13"], ["t13_max"]),
    ]
    outputs = ["o1", "o2", "o3", "o4", "o6", "o7", "o7b", "b1c", "r4", "i6", "t8_min", "t8_max", "t1_max", "t9_min",
               "t10_min", "t11_min", "t12_min", "r12", "t13_max"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    graph.value_info.append(helper.make_tensor_value_info("b1", TensorProto.FLOAT, None))
    before = graph.SerializeToString()
    model = helper.make_model(graph)
    assert modelopt_compat.blocked_reads(model, outputs=True) == {"o1": 32, "o7": 32, "t8": 32, "t1": 32}
    reorders = {n.output[0] for n in model.graph.node if n.op_type == "ReorderOutput"}
    assert reorders == {"o2", "o3", "o4", "o5", "o6", "o7b", "t9", "t10", "t11", "t12", "t13"}
    produced = {o for n in model.graph.node for o in n.output}
    assert {"o1", "o7"} <= produced and not {"b1", "b7"} & produced
    reads = {n.output[0]: n.input[0] for n in model.graph.node}
    assert [reads[t] for t in ("b1c", "o7b", "t8_min", "t8_max", "t1_max")] == ["o1", "o7", "b8", "b8", "o1"]
    assert [v.name for v in model.graph.value_info] == ["o1"]
    # without outputs (a "max" calibration's session): the reductions only
    model = helper.make_model(onnx.GraphProto.FromString(before))
    assert modelopt_compat.blocked_reads(model, outputs=False) == {"t8": 32, "t1": 32}
    reads = {n.output[0]: n.input[0] for n in model.graph.node}
    assert [reads[t] for t in ("b1c", "t8_min", "t1_max")] == ["b1", "b8", "b1"] and "o1" in reads


def _padded_model() -> onnx.ModelProto:
    """Convolutions of 8 -> 24 -> 32 -> 16 channels: onnxruntime's blocks of 16 pad the 24."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(5)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype("float32") * 0.2, f"w{i}")
             for i, s in enumerate([(24, 8, 3, 3), (32, 24, 3, 3), (16, 32, 3, 3)], 1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def _reducing_model() -> onnx.ModelProto:
    """A model that takes a ReduceMax of its own over a 32-channel activation (no calibration observes it), beside
    the convolutions whose inputs are observed."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(6)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16]),
               helper.make_tensor_value_info("peak", TensorProto.FLOAT, [1, 1, 1, 1])]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("ReduceMax", ["r2"], ["peak"], keepdims=1),
             helper.make_node("Conv", ["r1", "w3"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype("float32") * 0.2, f"w{i}")
             for i, s in enumerate([(32, 8, 3, 3), (32, 32, 3, 3), (16, 32, 3, 3)], 1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def _full_level_reference(tmp_path, monkeypatch, model, method: str = "entropy") -> dict:
    """The same calibration at onnxruntime's full level with every tensor read as usual (reordered back to NCHW):
    patch 11 with ``blocked_reads`` finding the tensors but changing nothing."""
    found = modelopt_compat.blocked_reads
    monkeypatch.setattr(modelopt_compat, "blocked_reads", lambda m, outputs: found(onnx.ModelProto.FromString(
        m.SerializeToString()), outputs))
    try:
        return _quantize_recording(tmp_path, fold=True, running=True, method=method, direct=True, model=model,
                                   blocked=True)
    finally:
        monkeypatch.setattr(modelopt_compat, "blocked_reads", found)


def _spy_fetched(monkeypatch) -> list:
    """A copy of every array the calibration sessions (patch 11's, and the reference's) return, by output name."""
    import onnxruntime as ort

    fetched: list = []
    run = ort.InferenceSession.run

    def spy(self, *a, **k):
        out = run(self, *a, **k)
        # copies: an observed graph input comes back over the feed's memory, which goes with the sample
        fetched.append({o.name: value.copy() for o, value in zip(self.get_outputs(), out)})
        return out

    monkeypatch.setattr(ort.InferenceSession, "run", spy)
    return fetched


@pytest.mark.parametrize("model", [_conv_mlp_model, _residual_model, _padded_model, _reducing_model])
def test_entropy_calibration_fetched_blocked_has_the_full_levels_histograms(tmp_path, monkeypatch, model):
    """Patch 11 hands the histograms the blocked tensors: the same values as the full level's reordered ones, in
    another order, so the same histograms, bin for bin, and the same scales; close to ModelOpt's own (other
    kernels round differently: an ulp or two); a padded tensor (24 channels) is fetched reordered."""
    import numpy as np

    (tmp_path / "ref").mkdir()
    (tmp_path / "blocked").mkdir()
    fetched = _spy_fetched(monkeypatch)
    ref = _full_level_reference(tmp_path / "ref", monkeypatch, model)
    arrays_ref, fetched[:] = list(fetched), []
    rec = _quantize_recording(tmp_path / "blocked", fold=True, running=True, method="entropy", direct=True,
                              model=model, blocked=True)
    line = [n for n in rec["notes"] if "patch 11" in n]
    if "no observed tensor" in line[0]:
        pytest.skip("onnxruntime has no blocked layout on this processor")
    assert "blocked channel layout" in line[0]
    _assert_same_histograms(rec["histograms"], ref["histograms"])
    _assert_same_scales(rec["scales"], ref["scales"])
    # what was fetched: per sample, the same multiset of values; some tensors in another order (blocked)
    ours = [f for f in fetched if "r1" in f]  # the calibration session's runs (r1: a Conv's input in each model)
    theirs = [f for f in arrays_ref if f.keys() == ours[0].keys()]
    assert len(ours) == len(theirs) >= 8
    reordered = set()
    for mine, want in zip(ours, theirs):
        for name, value in mine.items():
            np.testing.assert_array_equal(np.sort(value, axis=None), np.sort(want[name], axis=None), err_msg=name)
            if not np.array_equal(value, want[name]):
                reordered.add(name)
    assert reordered
    if model is _padded_model:
        assert "r1" not in reordered  # 24 channels: fetched reordered back, no padding in its histogram
    upstream = _quantize_recording(tmp_path / "upstream", fold=False, running=False, method="entropy", model=model,
                                   probes=False)
    for name, value in rec["scales"].items():
        np.testing.assert_allclose(value, upstream["scales"][name], rtol=1e-6, err_msg=name)



def test_a_padded_tensor_fetched_blocked_is_refused(tmp_path, monkeypatch):
    """Were the 24-channel tensor fetched blocked (padded to 32 by AVX-512's blocks of 16), its histogram would
    count the padding: the check on the fetched shape refuses it."""
    if not (modelopt_compat._NATIVE and "avx512" in modelopt_compat._NATIVE.simd_levels()):
        pytest.skip("onnxruntime blocks channels by 16 only with AVX-512")
    monkeypatch.setattr(modelopt_compat, "_NEVER_PADDED", 8)
    with pytest.raises(RuntimeError, match="patch 11 fetched (c1|r1) .* expecting 24 channels"):
        _quantize_recording(tmp_path, fold=True, running=True, method="entropy", direct=True, model=_padded_model,
                            blocked=True)


def test_blocked_fetch_of_a_model_with_external_data_has_the_same_histograms(tmp_path):
    recs = [_quantize_recording(tmp_path / str(external), fold=True, running=True, method="entropy", direct=True,
                                blocked=True, external=external) for external in (False, True)]
    for rec in recs:
        line = [n for n in rec["notes"] if "patch 11" in n]
        if "no observed tensor" in line[0]:
            pytest.skip("onnxruntime has no blocked layout on this processor")
        assert "blocked channel layout" in line[0]
    _assert_same_histograms(recs[1]["histograms"], recs[0]["histograms"])


@pytest.mark.parametrize("model", [_conv_mlp_model, _residual_model, _padded_model, _reducing_model])
def test_max_calibration_reducing_blocked_tensors_has_the_full_levels_scales(tmp_path, monkeypatch, model):
    """"max" observes through ReduceMin/ReduceMax over every axis: patch 11 lets them read the blocked tensors, and
    the scales are the full level's with the reorders kept, bit for bit, and an ulp or two from ModelOpt's own."""
    import numpy as np
    import onnxruntime as ort

    (tmp_path / "ref").mkdir()
    ref = _full_level_reference(tmp_path / "ref", monkeypatch, model, method="max")
    opened: list = []
    init = ort.InferenceSession.__init__

    def spy(self, path_or_bytes, *a, **k):  # the graph patch 11's session opens (its folder goes with the call)
        if str(path_or_bytes).endswith(".qdqkit-all.onnx"):
            opened.append(onnx.load(path_or_bytes, load_external_data=False))
        init(self, path_or_bytes, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "__init__", spy)
    rec = _quantize_recording(tmp_path / "blocked", fold=True, running=True, method="max", model=model, blocked=True)
    monkeypatch.undo()
    line = [n for n in rec["notes"] if "patch 11" in n]
    if "no observed tensor" in line[0]:
        pytest.skip("onnxruntime has no blocked layout on this processor")
    assert "reduced tensors in onnxruntime's blocked channel layout" in line[0]
    session_model, = opened
    graph = session_model.graph
    channels = {n.output[0]: n.attribute for n in graph.node if n.op_type == "ReorderOutput"}
    reduced = {n.input[0] for n in graph.node if n.op_type in ("ReduceMin", "ReduceMax")}
    other = {i for n in graph.node if n.op_type not in ("ReduceMin", "ReduceMax") for i in n.input}
    other |= {o.name for o in graph.output}
    assert reduced - set(channels) - {"x"}  # some reductions read a blocked tensor
    for name in reduced & set(channels):  # the others' copies stay for another reader, or for padding
        assert name in other or {a.name: a.i for a in channels[name]}["channels"] % 16, name
    if model is _padded_model:
        assert "r1" in reduced & set(channels)  # 24 channels: reordered back, so its ranges count no padding
    _assert_same_scales(rec["scales"], ref["scales"])
    upstream = _quantize_recording(tmp_path / "upstream", fold=False, running=False, model=model, probes=False)
    for name, value in rec["scales"].items():
        np.testing.assert_allclose(value, upstream["scales"][name], rtol=1e-6, err_msg=name)


def test_blocked_fetch_only_on_the_cpu_and_for_histograms_under_patch_7(tmp_path):
    class Calibrator:
        def collect_data(self, reader):
            pass

    Calibrator.collect_data.qdqkit_original = None  # as if patch 7's loop
    for providers in (["CUDAExecutionProvider", "CPUExecutionProvider"], [("TensorrtExecutionProvider", {})], []):
        for outputs in (True, False):
            assert "CPU provider alone" in modelopt_compat._blocked_model(
                Calibrator(), {"execution_providers": providers}, outputs)
    del Calibrator.collect_data.qdqkit_original
    assert "patch 7" in modelopt_compat._blocked_model(Calibrator(), {"execution_providers": ["CPUExecutionProvider"]},
                                                       outputs=True)


# -- patch 8: only the ranges the quantizer reads are calibrated -------------------------------------------------

def _quantized(model) -> set:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _assert_same_model(got, want) -> None:
    assert got.SerializeToString() == want.SerializeToString()


@pytest.fixture(scope="module")
def upstream_residual(tmp_path_factory):
    """ModelOpt's own entropy calibration of the residual model, every calibration patch off."""
    return _quantize_recording(tmp_path_factory.mktemp("upstream_residual"), fold=False, running=False,
                               method="entropy", model=_residual_model, probes=False)


def test_modelopt_calibrates_ranges_its_quantizer_never_reads_upstream(upstream_entropy, upstream_residual):
    for rec in (upstream_entropy, upstream_residual):
        calibrated, quantized = set(rec["histograms"]), _quantized(rec["model"])
        # every input and output of a node to quantize is calibrated, also those that never get a Q/DQ: patch 8 has
        # work to do
        assert calibrated - quantized and calibrated & quantized


@pytest.mark.parametrize("method", ["entropy", "max"])
def test_calibration_of_read_ranges_only_gives_modelopts_model(tmp_path, method, upstream_residual, recwarn):
    want = upstream_residual if method == "entropy" else \
        _quantize_recording(tmp_path / "upstream", fold=False, running=False, method=method, model=_residual_model,
                            probes=False)
    rec = _quantize_recording(tmp_path, fold=False, running=False, method=method, model=_residual_model,
                              read_only=True)
    # the same model, Q/DQ and scales byte for byte, at the first attempt
    _assert_same_model(rec["model"], want["model"])
    assert not [w for w in recwarn if "patch 8" in str(w.message)]
    if method == "entropy":
        # only the tensors that keep a Q/DQ were calibrated, with the same histograms as upstream; the Add's
        # fused input, whose range the quantizer reads but whose Q/DQ ModelOpt removes, took a unit range
        assert set(rec["histograms"]) == _quantized(rec["model"]) - {"w1", "w2", "w3"} == {"x", "r1", "r2"}
        _assert_same_histograms_of(rec["histograms"], {k: want["histograms"][k] for k in rec["histograms"]})
        # and the report says so
        assert rec["notes"] == [f"calibrated 3 of the {len(want['histograms'])} tensors ModelOpt observes; the other "
                                f"{len(want['histograms']) - 3} are tensors whose ranges its quantizer does not read or "
                                "(1) whose Q/DQ it removes afterwards (qdqkit patch 8; the same model)"]


def test_calibration_of_read_ranges_only_with_every_patch_gives_modelopts_model(tmp_path, upstream_entropy,
                                                                               upstream, recwarn):
    for method, want in (("entropy", upstream_entropy), ("max", upstream)):
        rec = _quantize_recording(tmp_path / method, fold=True, running=True, direct=True, method=method,
                                  read_only=True)
        _assert_same_scales(rec["scales"], want["scales"])
        _assert_same_model(rec["model"], want["model"])
        if method == "entropy":
            assert len(rec["histograms"]) < len(upstream_entropy["histograms"])
    assert not [w for w in recwarn if "patch 8" in str(w.message)]


def test_a_tensor_that_shares_a_read_range_is_calibrated_with_it(tmp_path, monkeypatch, upstream, recwarn):
    # "max" gives the Concat's output and its input r1 one range (ModelOpt's group_qdq_tensors); as if the quantizer
    # read only the Concat's, r1 must be calibrated all the same (else the quantizer's read of r1 would send the
    # call back to a full calibration, with a warning)
    dry_run = modelopt_compat._dry_run

    def narrower(*args):
        read, model = dry_run(*args)
        assert {"cat", "r1"} <= read
        return read - {"r1"}, model

    monkeypatch.setattr(modelopt_compat, "_dry_run", narrower)
    rec = _quantize_recording(tmp_path, fold=True, running=True, direct=True, method="max", read_only=True)
    assert {"cat", "r1"} <= rec["groups"]["cat"]
    _assert_same_scales(rec["scales"], upstream["scales"])
    assert not [w for w in recwarn if "patch 8" in str(w.message)]


@pytest.mark.parametrize("reader", [_Rewinding, _Once])
def test_a_range_read_after_all_is_calibrated_again_or_refused(tmp_path, monkeypatch, reader, upstream_residual):
    dry_run = modelopt_compat._dry_run

    def forgetful(*args):
        read, model = dry_run(*args)
        return read - {"r2"}, model  # as if the dry run had missed one

    monkeypatch.setattr(modelopt_compat, "_dry_run", forgetful)
    if reader is _Once:  # no second calibration from a reader that cannot start again
        with pytest.raises(RuntimeError, match="read_ranges_only=False"):
            _quantize_recording(tmp_path, fold=False, running=False, method="entropy", model=_residual_model,
                                read_only=True, reader=reader)
        return
    with pytest.warns(UserWarning, match="calibrating again with every range"):
        rec = _quantize_recording(tmp_path, fold=False, running=False, method="entropy", model=_residual_model,
                                  read_only=True, reader=reader)
    _assert_same_model(rec["model"], upstream_residual["model"])
    assert set(rec["histograms"]) == set(upstream_residual["histograms"])


@pytest.mark.parametrize("high", ["fp32", "fp16"])
def test_a_unit_range_that_keeps_its_qdq_is_refused(tmp_path, monkeypatch, high):
    removed = modelopt_compat._removed_afterwards
    # as if ModelOpt were to remove the Q/DQ of r2, which it keeps (in float16, behind a Cast)
    monkeypatch.setattr(modelopt_compat, "_removed_afterwards", lambda *a: removed(*a) | {"r2"})
    with pytest.raises(RuntimeError, match="unit range"):
        _quantize_recording(tmp_path, fold=False, running=False, method="entropy", model=_residual_model,
                            read_only=True, high=high)


@pytest.mark.parametrize("kept_bytes, loads", [(512 * 2**20, 1), (0, 2)])
def test_shapes_are_inferred_once_for_a_model_small_enough_to_keep(tmp_path, monkeypatch, kept_bytes, loads):
    import importlib

    mod_name, attr = modelopt_compat._SHAPES_LOADER
    mod = importlib.import_module(mod_name)
    original, calls = getattr(mod, attr), []
    monkeypatch.setattr(mod, attr, lambda path: calls.append(path) or original(path))
    monkeypatch.setattr(modelopt_compat, "_KEPT_INFERRED_BYTES", kept_bytes)
    before = getattr(mod, attr)
    onnx.save(_two_plugin_model(), tmp_path / "m.onnx")
    with modelopt_compat._shapes_inferred_once():
        first, second = (getattr(mod, attr)(tmp_path / "m.onnx") for _ in range(2))
    assert len(calls) == loads
    assert first is not second and first == second  # every caller gets its own model to change
    assert getattr(mod, attr) is before  # restored


# -- patch 9: shape probes ------------------------------------------------------------------------------------------

def _mha_model(seq: int = 600, dim: int = "static") -> onnx.ModelProto:
    """An attention core over ``seq`` tokens (ModelOpt's MHA probe leaves it unquantized in INT8 past 512) and a
    projection to 8 features (its small-GEMM probe leaves that out: N < 16). ``dim="dynamic"`` names the batch."""
    import numpy as np
    from onnx import numpy_helper

    rng = np.random.default_rng(5)
    batch = 1 if dim == "static" else "batch"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, 8])
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale"),
        helper.make_node("Softmax", ["ss"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["c"], name="context"),
        helper.make_node("MatMul", ["c", "wo"], ["y"], name="small_out"),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype("float32") * 0.2, n)
             for n in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(rng.standard_normal((32, 8)).astype("float32") * 0.2, "wo"),
              numpy_helper.from_array(np.array(32 ** -0.5, dtype="float32"), "scale")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def _quantize_probing(tmp_path, model: onnx.ModelProto, probes: bool) -> tuple:
    """Quantize ``model`` (entropy, 4 samples) with patch 9 on or off; returns the quantized model, how often
    ModelOpt's original probe ran an inference, and the patch notes."""
    import importlib

    import numpy as np
    from modelopt.onnx.quantization import quantize

    mod_name, attr = modelopt_compat._EXTENDED_OUTPUTS
    mod = importlib.import_module(mod_name)
    original, runs = getattr(mod, attr), []

    def counting(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    setattr(mod, attr, counting)
    tmp_path.mkdir(parents=True, exist_ok=True)
    try:
        with modelopt_compat.patched_modelopt(shape_probes=probes) as notes, \
                modelopt_compat.run_in_private_dir(tmp_path) as d:
            onnx.save(model, d / "m.onnx")
            shape = [dd.dim_value or 1 for dd in model.graph.input[0].type.tensor_type.shape.dim]
            data = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype("float32")
            quantize(onnx_path=str(d / "m.onnx"), quantize_mode="int8", calibration_data={"x": data},
                     calibration_method="entropy", calibration_eps=["cpu"], high_precision_dtype="fp32",
                     dq_only=False, output_path=str(d / "q.onnx"), log_level="ERROR")
            return onnx.load(str(d / "q.onnx")), len(runs), notes.lines()
    finally:
        setattr(mod, attr, original)


def test_modelopt_runs_inference_for_its_shape_probes_upstream(tmp_path):
    q, runs, _ = _quantize_probing(tmp_path, _mha_model(), probes=False)
    assert runs == 2  # the small-GEMM probe and the MHA probe, each a run of the model with extra outputs
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    # what the probes decided: the attention core (600 tokens) and the 8-feature projection stay unquantized
    assert "q" not in quantized and "c" not in quantized and "x" in quantized


def test_shape_probes_answered_by_shape_inference_give_modelopts_model(tmp_path):
    want, _, _ = _quantize_probing(tmp_path / "off", _mha_model(), probes=False)
    got, runs, notes = _quantize_probing(tmp_path / "on", _mha_model(), probes=True)
    assert runs == 0  # ModelOpt's inference never ran: both probes were answered by shape inference
    assert notes[-1].startswith("2 of ModelOpt's 2 shape probes answered by shape inference")
    assert got.SerializeToString() == want.SerializeToString()


def test_shape_probes_with_a_dynamic_dimension_run_modelopts_inference(tmp_path, monkeypatch):
    calls = []
    original = modelopt_compat._static_outputs
    monkeypatch.setattr(modelopt_compat, "_static_outputs", lambda m: calls.append(r := original(m)) or r)
    want, _, _ = _quantize_probing(tmp_path / "off", _mha_model(dim="dynamic"), probes=False)
    got, runs, notes = _quantize_probing(tmp_path / "on", _mha_model(dim="dynamic"), probes=True)
    assert runs == 2 and calls == [None, None]  # no static answer: ModelOpt's own inference ran (the same model below)
    assert notes[-1].startswith("0 of ModelOpt's 2 shape probes")
    assert got.SerializeToString() == want.SerializeToString()


def test_a_shape_probe_answer_refuses_to_give_values():
    import numpy as np

    a = modelopt_compat.ShapeOnly((2, 3), np.dtype("float32"))
    assert a.shape == (2, 3) and a.ndim == 2 and a.dtype == np.float32
    with pytest.raises(RuntimeError, match="patch 9"):
        np.asarray(a)
    with pytest.raises((TypeError, AttributeError)):
        a[0]  # reading a value: ShapeOnly has no item access


def test_a_shape_probe_answer_ignores_a_stale_declared_shape():
    """A model whose value_info says 16 where its MatMul makes 32 (onnxruntime runs it with 32, only warning):
    the probe answer is what the ops derive."""
    import numpy as np
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 600, 8])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"]), helper.make_node("MatMul", ["q", "w2"], ["y"])]
    inits = [numpy_helper.from_array(np.zeros((32, 32), np.float32), "w"),
             numpy_helper.from_array(np.zeros((32, 8), np.float32), "w2")]
    g = helper.make_graph(nodes, "g", [x], [y], inits,
                          value_info=[helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 600, 16])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.graph.output.extend([onnx.ValueInfoProto(name="q"), onnx.ValueInfoProto(name="x")])  # as ModelOpt adds them
    got = modelopt_compat._static_outputs(m)
    assert {k: v.shape for k, v in got.items()} == {"y": (1, 600, 8), "q": (1, 600, 32), "x": (1, 600, 32)}


def test_a_failing_dry_run_leaves_the_call_as_it_was_and_the_report_says_why(tmp_path, monkeypatch,
                                                                             upstream_residual):
    """Where patch 8's dry run fails, the call calibrates every tensor (ModelOpt's own model) and the report line
    names the failure, instead of patch 8 switching itself off in silence."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("no dry run today")

    monkeypatch.setattr(modelopt_compat._UnitRanges, "__init__", broken)
    rec = _quantize_recording(tmp_path, fold=False, running=False, method="entropy", model=_residual_model,
                              read_only=True, probes=False)
    _assert_same_model(rec["model"], upstream_residual["model"])
    assert set(rec["histograms"]) == set(upstream_residual["histograms"])
    assert rec["notes"] == ["every tensor ModelOpt observes was calibrated: its dry run failed (RuntimeError: no dry "
                            "run today) (qdqkit patch 8 off for the call)"]


# -- patch 10: ModelOpt's loggers without handlers of their own -----------------------------------------------------

def _tiny_bias_model() -> onnx.ModelProto:
    """x @ w + b with one bias value (1e-9) below FP16's smallest: where ModelOpt types the model FP16, AutoCast
    replaces that value and warns through ModelOpt's logger."""
    import numpy as np
    from onnx import numpy_helper

    b = np.full(16, 0.01, np.float32)
    b[0] = 1e-9
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    inits = [numpy_helper.from_array(np.full((16, 16), 0.01, np.float32), "w"), numpy_helper.from_array(b, "b")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def _warnings_of_an_fp16_quantize(tmp_path, handlers_off: bool) -> list[str]:
    """ModelOpt's INT8 quantize with FP16 high precision, as the qdq pass calls it (log level WARNING), of the
    tiny-bias model; returns the messages of the warnings that reached the root logger. Upstream, ModelOpt's loggers
    get back the handlers they had before (the call leaves one on the test's captured stdout); patched, that is
    left to the patch."""
    import logging

    import numpy as np
    from modelopt.onnx.quantization import quantize

    class Kept(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    messages: list[str] = []
    kept, root = Kept(logging.WARNING), logging.getLogger()
    own = [(log, list(log.handlers)) for log in map(logging.getLogger, ("modelopt.onnx", "modelopt.onnx.autocast"))]
    root.addHandler(kept)
    try:
        with modelopt_compat.patched_modelopt(log_handlers_off=handlers_off), \
                modelopt_compat.run_in_private_dir(tmp_path) as d:
            onnx.save(_tiny_bias_model(), d / "m.onnx")
            data = np.random.default_rng(0).standard_normal((_SAMPLES, 16)).astype("float32")
            quantize(onnx_path=str(d / "m.onnx"), quantize_mode="int8", calibration_data={"x": data},
                     calibration_eps=["cpu"], high_precision_dtype="fp16", dq_only=False,
                     output_path=str(d / "q.onnx"), log_level="WARNING")
    finally:
        root.removeHandler(kept)
        for log, handlers in own if not handlers_off else ():
            for handler in list(log.handlers):
                log.removeHandler(handler)
            for handler in handlers:
                log.addHandler(handler)
    return messages


TINY_VALUE_WARNING = "Some initializers contain values smaller than smallest fp16 value"


def test_modelopt_prints_its_warnings_on_stdout_upstream(tmp_path, capfd):
    capfd.readouterr()
    messages = _warnings_of_an_fp16_quantize(tmp_path, handlers_off=False)
    out = capfd.readouterr().out
    # the handler quantize() installed wrote it in ModelOpt's format, whatever the caller's logging says
    assert f"[modelopt][onnx] - WARNING - {TINY_VALUE_WARNING}" in out, out
    assert any(m.startswith(TINY_VALUE_WARNING) for m in messages)


def test_patched_modelopt_leaves_its_warnings_to_the_root_logger(tmp_path, capfd):
    import importlib
    import logging

    handlers = {n: list(logging.getLogger(n).handlers) for n in ("modelopt.onnx", "modelopt.onnx.autocast")}
    capfd.readouterr()
    messages = _warnings_of_an_fp16_quantize(tmp_path, handlers_off=True)
    # nothing printed, although quantize() and its INT8 path each ran configure_logging inside the block
    assert capfd.readouterr() == ("", "")
    assert sum(m.startswith(TINY_VALUE_WARNING) for m in messages) == 1
    # ModelOpt's loggers have their handlers back, and nothing stays wrapped
    assert {n: list(logging.getLogger(n).handlers) for n in handlers} == handlers
    for mod_name in modelopt_compat._LOGGING_CONFIGURERS:
        assert not hasattr(importlib.import_module(mod_name).configure_logging, "qdqkit_original")


def _gated_conv_model() -> onnx.ModelProto:
    """x[1,32,8,8] -> Conv -> Relu -> ToyGateTRT (a Python kernel only: it stays a custom node in every session's
    model) -> Conv -> y: NCHWc-blockable convolutions around a custom op."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype("float32"), n)
             for n, s in (("w0", (32, 32, 3, 3)), ("w1", (32, 32, 3, 3)), ("g", (1, 32, 8, 8)))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="c0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
             helper.make_node("ToyGateTRT", ["r0", "g"], ["gated"], name="gate"),
             helper.make_node("Conv", ["gated", "w1"], ["y"], pads=[1, 1, 1, 1], name="c1")]
    graph = helper.make_graph(nodes, "gated_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, 32, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_patch_11s_model_stays_unoptimized_when_the_registry_opens_a_copy_of_it(tmp_path, toy_session,
                                                                                 monkeypatch):
    """A custom op with a Python kernel stays a node of patch 11's saved model, so the custom-op registry opens the
    session on a copy of it (another path): patch 4 must still leave that already optimized model at
    ORT_DISABLE_ALL, not optimize it a second time at the extended level."""
    import numpy as np
    import onnxruntime as ort
    from modelopt.onnx.quantization import quantize

    from qdqkit.quant_backends import modelopt_call

    opened: list = []
    init = ort.InferenceSession.__init__

    def spy(self, path_or_bytes, sess_options=None, *a, **k):  # innermost: the options onnxruntime gets
        proto = onnx.load_from_string(path_or_bytes) if isinstance(path_or_bytes, bytes) else \
            onnx.load(str(path_or_bytes), load_external_data=False)
        blocked = any(n.domain == "com.microsoft.nchwc" for n in proto.graph.node)
        opened.append((blocked, None if sess_options is None else sess_options.graph_optimization_level))
        init(self, path_or_bytes, sess_options, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "__init__", spy)
    data = np.random.default_rng(0).standard_normal((4, 32, 8, 8)).astype("float32")
    with modelopt_call(_gated_conv_model(), toy_session.custom_ops, tmp_path) as (src, _, notes):
        quantize(onnx_path=str(src), quantize_mode="int8", calibration_data={"x": data}, calibration_method="entropy",
                 calibration_eps=["cpu"], dq_only=False, output_path=str(src.parent / "q.onnx"), log_level="ERROR")
    line = [n for n in notes.lines() if "patch 11" in n]
    if "no observed tensor" in line[0]:
        pytest.skip("onnxruntime has no blocked layout on this processor")
    assert "blocked channel layout" in line[0]
    levels = [level for blocked, level in opened if blocked]
    assert levels and set(levels) == {ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
