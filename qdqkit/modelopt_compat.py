"""Everything qdqkit changes in, or works around of, NVIDIA ModelOpt, in one place.

Tested against ModelOpt 0.47. Each patched behaviour below has its own test in
``tests/core/test_modelopt_compat.py``, so a new ModelOpt release shows at once which one broke:

  1. ``interpret_trt_plugins_precision_flag`` keeps only the last plugin of each float precision (it assigns
     ``custom_ops_to_cast[precision] = {op: ...}`` per flag). Replaced, in every module that imported it, by a
     wrapper that calls the original once per flag and merges the results.
  2. AutoCast's ``GraphSanitizer.find_custom_nodes`` asks TensorRT for plugin shapes whenever an op has no ONNX
     schema, and raises ``NameError: trt`` without TensorRT. qdqkit registers schemas for every known custom op
     so it normally finds nothing; for an op without a schema the replacement moves it to ``trt.plugins`` and
     leaves its types to ONNX shape inference instead of TensorRT. Only installed when TensorRT is absent.

  3. ModelOpt monkeypatches onnxruntime's quantization classes (calibrators, QDQQuantizer, ...) for the rest of
     the process the first time it runs, which breaks onnxruntime's own ``quantize_static`` (the ``ort`` back
     end) afterwards. Their attributes are snapshotted before ModelOpt runs and restored after it.

  4. ModelOpt opens its calibration sessions (and its GEMV/MHA probes) with every onnxruntime graph optimization
     off (``ORT_DISABLE_ALL``). That re-computes every constant sub-graph on every sample, the index arithmetic
     of the custom ops' ONNX-function kernels included. Inside the block, such sessions are raised to
     ``ORT_ENABLE_EXTENDED``: constant folding, eliminations and fusions, none of which removes or merges away a
     node whose output is a graph output or has a second consumer, and every tensor the calibrator observes
     feeds the reduce nodes it adds, so what it records is computed as before (tested: same scales, bit for bit,
     on the test models; on BEVFormer-tiny 9 of 140 scales move by one or two float32 ulps, at most 2.6e-7
     relative, where a fusion inside an unobserved stretch rounds differently). Not ``ORT_ENABLE_ALL``: its
     layout transformations copy activations, which raised the BEVFormer-tiny qdq peak from 13.5 to 17.0 GB for
     no time gain. The same sessions also switch onnxruntime's CPU memory arena off, so every activation is a
     fresh allocation (page faults in proportion to the data); the arena is switched back on. Measured
     (benchmarks/qdq_calibration.py, RESULTS.md): per-sample calibration cost on the 64x64 test model 2.8x one
     plain inference upstream, 1.3x with this patch, 1.2x with patch 5 too; the BEVFormer-tiny qdq step
     (entropy, 8 frames) peaks at 13.4 GB in 107 s (basic level: 13.5 GB, 116 s; no arena: 11.9 GB, 115 s).

  5. ModelOpt's "max" calibration (``MinMaxCalibrater``) observes each tensor through a ReduceMin and a ReduceMax,
     each reshaped to its own graph output, fetches every output of the session, and after every sample merges
     the ranges in Python (a dict of lists, ``np.min`` per tensor, a ``TensorData`` per tensor): about 0.5 ms a
     sample for 50 observed tensors, half a plain inference of a small model, plus a Reshape and an output to
     convert per reduction. Inside the block the Reshapes are replaced by one Concat per rank and element type
     (so a handful of outputs), only those are fetched, and elementwise running minima and maxima are kept in
     one numpy array; ModelOpt's own ``compute_data`` then runs once on them, under the names it expects.
     Minimum of minima and maximum of maxima are what the per-sample merge computes (also for symmetric ranges
     and for the tensors a Concat makes share a range), so the scales are the same (tested, bit for bit). A
     moving average (order-dependent), per-channel ranges or a model saved with external data keep onnxruntime's
     augmentation; only the moving average also keeps ModelOpt's loop. Per-node calibration is ModelOpt's own.

Not patched but handled by the caller (`run_in_private_dir`): ModelOpt rewrites its input file in place and drops
``sym_shape_infer_temp.onnx`` and ``<uuid>.data`` in the current directory, so it runs on a private copy with
the working directory switched to a temporary folder. Its API defaults that differ from its CLI
(``high_precision_dtype``, ``dq_only``, ``calibration_eps``) are always passed explicitly by the backend.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TESTED_VERSION = "0.47"

_LOCK = threading.RLock()


def modelopt_version() -> str | None:
    """The installed ModelOpt version, or None when it is not installed."""
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:
        return None


def check_version() -> str:
    """Return the ModelOpt version; warn once if it is not the release these patches were written for."""
    v = modelopt_version()
    if v is None:
        from qdqkit.errors import UserError

        raise UserError("the modelopt backend needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]'")
    if not v.startswith(TESTED_VERSION + "."):
        warnings.warn(
            f"qdqkit's ModelOpt workarounds were written for ModelOpt {TESTED_VERSION}.x, found {v}; "
            "run tests/core/test_modelopt_compat.py to see which still apply",
            stacklevel=2,
        )
    return v


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


# -- patch 1: merge plugin precisions ---------------------------------------------------------------------------

_PRECISION_FLAG_USERS = ("modelopt.onnx.quantization.quantize", "modelopt.onnx.autocast.graphsanitizer")


def _merging_interpreter(original: Any) -> Any:
    def interpret(onnx_model: Any, trt_plugins_precision: list[str], quantize_mode: str = "int8") -> tuple[dict, dict]:
        to_cast: dict[str, dict] = {}
        to_quantize: dict[str, dict] = {}
        for flag in trt_plugins_precision or []:
            cast, quant = original(onnx_model, [flag], quantize_mode)
            for precision, ops in cast.items():
                to_cast.setdefault(precision, {}).update(ops)
            to_quantize.update(quant)
        return to_cast, to_quantize

    interpret.qdqkit_original = original  # type: ignore[attr-defined]
    return interpret


# -- patch 2: custom-node discovery without TensorRT -------------------------------------------------------------

def _find_custom_nodes_without_trt(self: Any) -> None:
    import onnx

    from qdqkit.customops import TRT_PLUGIN_DOMAIN

    self.custom_ops = {n.op_type for n in self.model.graph.node if n.op_type not in self.standard_ops}
    if not self.custom_ops:
        return
    for n in self.model.graph.node:
        if n.op_type in self.custom_ops and n.domain in ("", "ai.onnx"):
            n.domain = TRT_PLUGIN_DOMAIN
    if not any(o.domain == TRT_PLUGIN_DOMAIN for o in self.model.opset_import):
        self.model.opset_import.append(onnx.helper.make_opsetid(TRT_PLUGIN_DOMAIN, 1))
    # TensorRT would write plugin output types here; ONNX shape inference does it from the registered schemas.
    self.model = onnx.shape_inference.infer_shapes(self.model)


# -- patch 3: keep onnxruntime.quantization as it was --------------------------------------------------------------

_ORT_PATCHED = (
    ("onnxruntime.quantization.calibrate", ("CalibraterBase", "MinMaxCalibrater", "HistogramCalibrater",
                                             "HistogramCollector")),
    ("onnxruntime.quantization.qdq_quantizer", ("QDQQuantizer",)),
    ("onnxruntime.quantization.base_quantizer", ("BaseQuantizer",)),
)


@contextlib.contextmanager
def onnxruntime_quantization_restored() -> Iterator[None]:
    """Undo, on exit, any change made inside the block to onnxruntime's quantization classes and calibrate module."""
    owners: list[Any] = []
    for mod_name, classes in _ORT_PATCHED:
        mod = importlib.import_module(mod_name)
        owners.append(mod)
        owners.extend(getattr(mod, c) for c in classes if hasattr(mod, c))
    snapshot = [(o, dict(vars(o))) for o in owners]
    try:
        yield
    finally:
        for owner, before in snapshot:
            now = vars(owner)
            for key, value in before.items():
                if now.get(key) is not value:
                    setattr(owner, key, value)
            for key in [k for k in now if k not in before]:
                delattr(owner, key)


# -- patch 4: calibration sessions with constant folding -----------------------------------------------------------

@contextlib.contextmanager
def calibration_sessions_folded() -> Iterator[None]:
    """Sessions created inside the block with all optimizations off get the extended level (constant folding,
    fusions that keep every observed tensor) and the CPU memory arena instead (patch 4 in the module docstring)."""
    import onnxruntime as ort

    cls = ort.InferenceSession
    original = cls.__init__

    def init(self: Any, path_or_bytes: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> None:
        if sess_options is not None and \
                sess_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
            sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            sess_options.enable_cpu_mem_arena = True
        original(self, path_or_bytes, sess_options, *args, **kwargs)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original


# -- patch 5: "max" calibration gathers its reductions and keeps running minima and maxima ----------------------

_MINMAX_COLLECTOR = ("modelopt.onnx.quantization.ort_patching", "_collect_data_minmax_calibrator")
_REDUCED = ("_ReduceMin", "_ReduceMax")
_GATHERED = "qdqkit_minmax_"


def _gathering_augmenter(original: Any) -> Any:
    """onnxruntime's ``MinMaxCalibrater.augment_graph``, then each reduction's Reshape-to-output replaced by one
    Concat per rank and type (patch 5)."""

    def augment_graph(calibrator: Any) -> None:
        original(calibrator)
        # a moving average needs ModelOpt's per-sample loop; per-channel ranges are not of shape [1] * rank; and a
        # model saved with external data has handed its weights to that file, so it cannot be saved a second time
        if getattr(calibrator, "moving_average", False) or getattr(calibrator, "per_channel", False) or \
                getattr(calibrator, "use_external_data_format", False):
            return
        import onnx
        from onnx import helper

        graph = calibrator.model.graph
        producer = {o: n for n in graph.node for o in n.output}
        info = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
        outputs = {o.name for o in graph.output}
        groups: dict[tuple[int, int], list[tuple[str, str]]] = {}
        dropped: set[int] = set()
        for i, node in enumerate(graph.node):
            if node.op_type != "Reshape" or node.output[0] not in outputs or not node.output[0].endswith(_REDUCED):
                continue
            reduce = producer.get(node.input[0])
            if reduce is None or reduce.op_type not in ("ReduceMin", "ReduceMax") or len(reduce.input) != 1:
                continue
            t = info.get(reduce.input[0])
            if t is None or not t.type.tensor_type.HasField("shape"):
                continue  # rank unknown: keeps its own output
            key = (len(t.type.tensor_type.shape.dim), t.type.tensor_type.elem_type)
            groups.setdefault(key, []).append((node.output[0], node.input[0]))  # keepdims=1: shape [1] * rank
            dropped.add(i)
        if not groups:
            return
        calibrator.qdqkit_outputs = [o.name for o in graph.output]  # what the calibrator's arithmetic expects
        kept = [n for i, n in enumerate(graph.node) if i not in dropped]
        # the Reshapes' target shape, now unused (onnxruntime would warn about it on every session)
        shapes = {graph.node[i].input[1] for i in dropped} - {x for n in kept for x in n.input}
        kept_inits = [t for t in graph.initializer if t.name not in shapes]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
        gone = {name for members in groups.values() for name, _ in members}
        kept_outputs = [o for o in graph.output if o.name not in gone]
        gathered = []
        for (rank, elem), members in groups.items():
            name = f"{_GATHERED}{rank}_{elem}"
            kept.append(helper.make_node("Concat", [r for _, r in members], [name], name=name, axis=0))
            kept_outputs.append(helper.make_tensor_value_info(name, elem, [len(members)] + [1] * (rank - 1)))
            gathered.append((name, [n for n, _ in members]))
        del graph.node[:]
        graph.node.extend(kept)
        del graph.output[:]
        graph.output.extend(kept_outputs)
        calibrator.qdqkit_gathered = gathered
        onnx.save(calibrator.model, calibrator.augmented_model_path)

    augment_graph.qdqkit_original = original  # type: ignore[attr-defined]
    return augment_graph


class _Outputs:
    """Stands in for the session in ModelOpt's ``compute_data``, which reads only the output names from it."""

    def __init__(self, names: list[str]) -> None:
        self._outputs = [type("Output", (), {"name": n})() for n in names]

    def get_outputs(self) -> list[Any]:
        return self._outputs


def _running_minmax_collector(original: Any) -> Any:
    """ModelOpt's ``MinMaxCalibrater.collect_data`` with the per-sample work cut to two numpy calls (patch 5)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import TensorsData

    def collect_data(calibrator: Any, data_reader: Any) -> None:
        session = calibrator.infer_session
        present = [o.name for o in session.get_outputs()]
        gathered = getattr(calibrator, "qdqkit_gathered", None) or []
        names = getattr(calibrator, "qdqkit_outputs", None) or present
        singles = [n for n in present if n.endswith(_REDUCED)]
        fetch = [g for g, _ in gathered] + singles
        order = [n for _, members in gathered for n in members] + singles
        added = [n for n in names if n not in calibrator.model_original_outputs]
        # a moving average depends on the order of the samples, and an augmentation not recognised here on what
        # it observes: ModelOpt's own loop (which would not know the gathered outputs, hence the check)
        if getattr(calibrator, "moving_average", False) or sorted(order) != sorted(added) or \
                not all(n.endswith(_REDUCED) for n in added):
            if gathered:
                raise RuntimeError("qdqkit's gathered calibration outputs reached ModelOpt's own collector")
            return original(calibrator, data_reader)
        sizes = [len(m) for _, m in gathered] + [1] * len(singles)
        lo: Any = None
        hi: Any = None
        flat = False
        while True:
            inputs = data_reader.get_next()
            if not inputs:
                break
            values = session.run(fetch, inputs)  # only the reductions: the model's own outputs are never used
            if lo is None:
                flat = [v.size for v in values] == sizes and len({v.dtype for v in values}) == 1
            if flat:
                v = np.concatenate([x.reshape(-1) for x in values])
                if lo is None:
                    lo, hi = v, v.copy()
                else:
                    np.minimum(lo, v, out=lo)
                    np.maximum(hi, v, out=hi)
                continue
            parts = [x.reshape(-1)[j:j + 1] for x, (_, m) in zip(values, gathered) for j in range(len(m))]
            parts += values[len(gathered):]
            if lo is None:
                lo, hi = [x.copy() for x in parts], [x.copy() for x in parts]
            else:
                for a, b, x in zip(lo, hi, parts):
                    np.minimum(a, x, out=a)
                    np.maximum(b, x, out=b)
        if lo is None:
            return  # no sample: nothing recorded, as in ModelOpt's loop
        if flat:
            lo = [lo[i:i + 1] for i in range(len(lo))]  # the shape onnxruntime's Reshape to [-1] gives
            hi = [hi[i:i + 1] for i in range(len(hi))]
        # The minimum over samples of each sample's minimum is the minimum over all of them (the same for maxima,
        # for absolute maxima and for the groups ModelOpt merges), so one pass of ModelOpt's own compute_data over
        # these records the ranges its per-sample merge would have.
        reduced = {n: (a if n.endswith("_ReduceMin") else b) for n, a, b in zip(order, lo, hi)}
        calibrator.intermediate_outputs = [[reduced.get(n) for n in names]]
        calibrator.infer_session = _Outputs(names)
        try:
            ranges = calibrator.compute_data()
        finally:
            calibrator.infer_session = session
        if not isinstance(ranges, TensorsData):
            raise TypeError(f"compute_data must return a TensorsData, not {type(ranges)}")
        calibrator.clear_collected_data()

    collect_data.qdqkit_original = original  # type: ignore[attr-defined]
    return collect_data


@contextlib.contextmanager
def calibration_ranges_running() -> Iterator[None]:
    """ModelOpt's "max" calibration inside the block gathers its reductions into a few outputs and keeps running
    minima and maxima (patch 5)."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    mod = importlib.import_module(_MINMAX_COLLECTOR[0])
    collector = getattr(mod, _MINMAX_COLLECTOR[1])
    augmenter = MinMaxCalibrater.augment_graph
    if hasattr(collector, "qdqkit_original"):
        yield
        return
    setattr(mod, _MINMAX_COLLECTOR[1], _running_minmax_collector(collector))
    # ModelOpt installs its own augment_graph only for per-node calibration, whose collector is not this one
    MinMaxCalibrater.augment_graph = _gathering_augmenter(augmenter)
    try:
        yield
    finally:
        setattr(mod, _MINMAX_COLLECTOR[1], collector)
        MinMaxCalibrater.augment_graph = augmenter


@contextlib.contextmanager
def patched_modelopt(fold_constants: bool = True, running_ranges: bool = True) -> Iterator[None]:
    """Apply the patches listed in the module docstring for the duration of the block (re-entrant)."""
    check_version()
    with _LOCK, onnxruntime_quantization_restored():
        saved: list[tuple[Any, str, Any]] = []
        try:
            from modelopt.onnx import trt_utils

            merged = _merging_interpreter(trt_utils.interpret_trt_plugins_precision_flag)
            for mod_name in _PRECISION_FLAG_USERS:
                mod = importlib.import_module(mod_name)
                current = getattr(mod, "interpret_trt_plugins_precision_flag", None)
                if current is not None and not hasattr(current, "qdqkit_original"):
                    saved.append((mod, "interpret_trt_plugins_precision_flag", current))
                    mod.interpret_trt_plugins_precision_flag = merged
            if not tensorrt_available():
                from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer

                current = GraphSanitizer.find_custom_nodes
                if current is not _find_custom_nodes_without_trt:
                    saved.append((GraphSanitizer, "find_custom_nodes", current))
                    GraphSanitizer.find_custom_nodes = _find_custom_nodes_without_trt
            with calibration_sessions_folded() if fold_constants else contextlib.nullcontext(), \
                    calibration_ranges_running() if running_ranges else contextlib.nullcontext():
                yield
        finally:
            for owner, attr, value in reversed(saved):
                setattr(owner, attr, value)


@contextlib.contextmanager
def run_in_private_dir(parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh temporary folder that is also the working directory for the block; both undone afterwards.

    ModelOpt leaves files in the current directory and rewrites its input: running it here keeps the user's
    folder and input untouched. The working directory is process-wide, hence the lock.
    """
    with _LOCK:
        old = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="qdqkit-modelopt-", dir=parent) as tmp:
            os.chdir(tmp)
            try:
                yield Path(tmp)
            finally:
                os.chdir(old)
