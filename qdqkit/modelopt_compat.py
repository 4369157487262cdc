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
     end) afterwards. It also edits onnxruntime's registries of quantizable op types for good: every custom op a
     call quantizes (``trt_plugins_precision`` with int8) stays registered, so a later call in the same process
     quantizes that op's inputs and outputs too (BEVFormer-tiny after a plugin-precision run: bev_embed cosine
     0.44 instead of 0.996). The classes' attributes and the registries' contents are snapshotted before ModelOpt
     runs and restored after it.

  4. ModelOpt opens its calibration sessions (and its GEMV/MHA probes) with every onnxruntime graph optimization
     off (``ORT_DISABLE_ALL``). That re-computes every constant sub-graph on every sample, the index arithmetic
     of the custom ops' ONNX-function kernels included. Inside the block, such sessions are raised to
     ``ORT_ENABLE_EXTENDED``: constant folding, eliminations and fusions, none of which removes or merges away a
     node whose output is a graph output or has a second consumer, and every tensor the calibrator observes
     feeds the reduce nodes it adds, so what it records is computed as before (tested: same "max" scales, bit
     for bit, on the test models; entropy scales there, and 9 of BEVFormer-tiny's 140, move by one or two
     float32 ulps, at most 2.6e-7 relative, where a fusion inside an unobserved stretch rounds differently).
     Not ``ORT_ENABLE_ALL``: its layout transformations copy activations, which raised the BEVFormer-tiny qdq
     peak from 13.5 to 17.0 GB for no time gain. The same sessions also switch onnxruntime's CPU memory arena
     off, so every activation is a fresh allocation (page faults in proportion to the data); the arena is
     switched back on. Measured
     (benchmarks/qdq_calibration.py, RESULTS.md): per-sample calibration cost on the 64x64 test model 2.8x one
     plain inference upstream, 1.3x with this patch, 1.2x with patch 5 too; the BEVFormer-tiny qdq step
     (entropy, 8 frames) peaks at 13.4 GB in 107 s (basic level: 13.5 GB, 116 s; no arena: 11.9 GB, 115 s),
     all before patches 6 and 7 (with them: 7.9 GB in 40 s, ``bash examples/bevformer/run.sh``'s report).

  5. ModelOpt's "max" calibration (``MinMaxCalibrater``) observes each tensor through a ReduceMin and a ReduceMax,
     each reshaped to its own graph output, fetches every output of the session, and after every sample merges
     the ranges in Python (a dict of lists, ``np.min`` per tensor, a ``TensorData`` per tensor): about 0.5 ms a
     sample for 50 observed tensors, half a plain inference of a small model, plus a Reshape and an output to
     convert per reduction. Inside the block the Reshapes are replaced by one Concat per rank and element type
     (so a handful of outputs), only those are fetched, and elementwise running minima and maxima are kept in
     place, one array per output; ModelOpt's own ``compute_data`` then runs once on them, under the names it expects.
     Minimum of minima and maximum of maxima are what the per-sample merge computes (also for symmetric ranges
     and for the tensors a Concat makes share a range), so the scales are the same (tested, bit for bit). A
     moving average (order-dependent), per-channel ranges or a model saved with external data keep onnxruntime's
     augmentation; only the moving average also keeps ModelOpt's loop. Per-node calibration is ModelOpt's own.

  6. ModelOpt's histogram calibrations (entropy, its default for BEVFormer-tiny; distribution; percentile without
     symmetry) fetch every observed tensor of every sample and, in ModelOpt's ``_collect_value``, flatten it to a
     copy (concatenated with the tensors that share its range), take its minimum and maximum, and hand it to
     ``np.histogram`` (directly, or through onnxruntime's ``merge_histogram`` from the second sample on). On
     BEVFormer-tiny that is about 1.2 billion values a sample, 6.3 s of it against 2.9 s for the run that
     produced them. Inside the block the same histograms are built without the copies (pieces are histogrammed
     over the shared range and their counts added), with numpy's bin assignment replayed in fewer steps (numpy's
     edges and quotient, its corrections computed only for the elements near an edge, which the quotient's
     monotony bounds from the edges), and different tensors in parallel threads. Bins, edges, extremes and
     thresholds are the same, so the scales are (tested, bit for bit, against ModelOpt's own path; the bin
     assignment against ``np.histogram`` on values placed on and beside every edge; the 140 BEVFormer-tiny
     scales identical). NaN, inf, empty, mixed or non-float data, a group whose extreme is zero (whose sign a
     reduction over the concatenation decides), and a collector with another ``merge_histogram`` go to
     ModelOpt's code, per tensor. Tensors under 1K values keep ``np.histogram`` (its per-call cost is lower), as
     do those under 64K where the compiled code below is missing.
     Where ``pip install`` could compile ``qdqkit/_histogram.c`` (it needs a C compiler; without one the numpy
     code above runs), the bins of a piece that lies wholly inside the range are assigned in one compiled pass:
     numpy's guess computed in numpy's dtypes, operation for operation, then numpy's two corrections against the
     edges (the compiled code declines, and the numpy code runs, wherever a guess leaves the bins or the dtypes
     are others). On a processor with AVX-512 (chosen at run time), float32 data and edges go sixteen elements at
     a time, each guessed by a float32 product, (x - edges[0]) * scale, instead of numpy's division wherever both
     guesses are bounded (each is then at most a bin off the bin the edges give, which numpy's corrections reach
     from either); the edges are read only for a vector holding an element near one (bounded as above), and zeros
     (half of a ReLU's output, on the middle edge of a symmetric range) take their bin, computed once, and are
     counted there by a population count instead of one increment each. From the
     second sample on, a merge is counted over the old range with the extremes in the same pass, and kept where
     the extremes show that onnxruntime's merge uses that range; otherwise those extremes serve the usual merge.
     Tested bin for bin against ``np.histogram`` and against ModelOpt, with and without the compiled code, at
     both levels.
     Measured (RESULTS.md): BEVFormer-tiny entropy calibration 8.25 s a frame without this patch, 5.4-5.6 s with
     its numpy code, 2.8 s with the scalar compiled passes and patch 7, 1.67 s with AVX-512 and the fused
     merges (one plain frame: 1.1-1.2 s); no measurable change on the small test models.

  7. ModelOpt's loop over the samples of a histogram calibration keeps the previous sample's outputs in its
     local variables while the next sample runs, so two samples' observed tensors are alive at once (on
     BEVFormer-tiny 2 x 5 GB) and onnxruntime's arena grows to hold both. Inside the block the loop does the same
     per-sample work (outputs by name, Concat groups' members added in the group's order, the collector made on
     the first sample with the calibrator's settings) in a function whose locals are gone before the next run.
     The sample's feed is kept until its sample is collected: onnxruntime returns an observed graph input as an
     array over the feed's memory without holding the feed (tested through qdqkit's own reader).
     Tested: no array of one run is alive when the next run starts (upstream: some are), histograms identical.
     BEVFormer-tiny's qdq step peaks at 8.0 GB instead of 13.4 GB.

  8. ModelOpt calibrates every float input and output of every node it quantizes, and its quantizer then reads
     the ranges of only some of them: on BEVFormer-tiny it observes 277 tensors (1.24 billion values a sample) and
     reads 102 (790 million); its post-processing (``remove_partial_input_qdq``) then takes the Q/DQ of 17 of those
     away again, so 85 (537 million) reach the model. Inside the block, each of ModelOpt's ``quantize_static``
     calls first runs dry: the same function, same arguments, with a calibrator that calibrates nothing and gives
     every tensor the range [-1, 1], and a quantizer whose parameter table records which tensors are looked up
     (anything that lists or copies the table makes the dry run inconclusive, and nothing is left out). On the
     dry run's output, ModelOpt's own ``remove_partial_input_qdq`` and a clean-up show which Q/DQ go again. The
     real call then calibrates only the tensors that are read and keep their Q/DQ (with every tensor that shares a
     range with one of them); those read whose Q/DQ go again get the range [-1, 1] for the quantizer to place and
     ModelOpt to remove. Ranges are per tensor, so every kept one is what it was: same model, byte for byte
     (tested on a residual block and the Concat model, "max" and entropy; checked once on BEVFormer-tiny, both
     methods, by a script not kept). Two checks guard the assumption that the dry run sees what the real one
     does: a real quantizer looking up a tensor left out makes the call calibrate again with every range (with a
     warning; an error where the reader cannot start again), and a tensor given the unit range that still has a
     Q/DQ in ModelOpt's result (followed back through Casts) is an error. The shape inference ModelOpt runs on each
     load of its input (twice a call, twice more for the dry run) runs once. ``patched_modelopt`` yields the
     ``PatchNotes`` that say, for a report, how many tensors were calibrated of how many.
     Measured (RESULTS.md): on BEVFormer-tiny the histograms of a sample 0.37x -> 0.18x one plain frame, fixed
     overhead 26 -> 22 s (the entropy thresholds of 85 tensors instead of 277); the demo's qdq step (8 frames)
     41.2 s -> 35.7 s, peak 7.9 -> 5.2 GB.

  9. Before calibrating, ModelOpt probes shapes twice: which MatMul/Gemm are GEMVs or too small for INT8 Tensor
     Cores, and how long each attention's sequence is (INT8 attention past 512 tokens stays unquantized). Each
     probe saves or serializes the model with extra outputs, opens a session and runs it on the first sample, and
     uses nothing of the outputs but their shapes. Inside the block, a probe whose outputs all have static shapes
     under ONNX shape inference (qdqkit registers the custom ops' schemas and shape functions; with static model
     inputs every shape is static) gets those shapes instead, as ``ShapeOnly`` objects that refuse to give
     values. The inference drops the model's declared intermediate shapes first and is strict, so a stale
     declaration (which onnxruntime would override, only warning) is not believed; a dynamic dimension or any
     inference error keeps ModelOpt's inference. Tested: the same model byte for byte
     on an attention model where both probes decide something, and with a dynamic batch (the fallback); checked
     once on BEVFormer-tiny by a script not kept (bevformer-int8's and mha-excluded rules, serialized models
     equal). Measured (RESULTS.md, ``benchmarks/qdq_calibration.py --time-only --bevformer --method entropy --samples
     2 6 --repeats 2 --plain-runs 3 --variants shipped without-shape-probes``): BEVFormer-tiny's fixed overhead
     20.7 -> 16.8 s. ``PatchNotes`` says how many probes
     were answered.

 10. ModelOpt prints its own log records: ``configure_logging`` replaces the handlers of its ``modelopt.onnx``
     logger with a handler on ``sys.stdout`` in its own format, once on import and again on every ``quantize``
     call (``quantize`` and the INT8 path's own ``quantize`` each call it), and AutoCast's records reach that
     handler too. So a warning such as AutoCast's on an initializer value below FP16's smallest went to stdout
     whatever the caller asked for (``qdqkit -q`` printed it). Inside the block ModelOpt's loggers have no
     handlers: those found on entry are taken off and put back on exit, and those ``configure_logging`` installs
     (wrapped in every module that imported it) are taken off as soon as it returns, keeping the levels it sets.
     The records go on to the root logger, where the CLI's ``report.LibraryWarnings`` counts them for the report
     and shows each once unless the run is quiet. AutoCast's own ``configure_logging`` runs only when its modules
     are imported, which ``modelopt.onnx`` does before any block. Tested: a real quantize with FP16 high
     precision prints ModelOpt's warning on stdout upstream, nothing with the patch, and the record reaches the
     root logger either way.

 11. A calibration session on the CPU (patch 4's extended level) cannot use onnxruntime's NCHWc layout, whose blocked
     convolutions are what the full level (``ORT_ENABLE_ALL``) gains on a ResNet; at the full level every observed
     tensor would be copied back to NCHW (a ``ReorderOutput``) to become a graph output or to feed the reductions of
     "max", and those copies cost what the layout gains. But a histogram, a minimum and a maximum, and so a scale, do
     not depend on the order of the values. Inside the block, the session's model is optimized at the full level and
     saved (``optimized_model_filepath``, its weights in a file beside it, in onnxruntime's temporary folder for the
     call), and ``blocked_reads`` takes out each ``ReorderOutput`` whose tensor goes only to a ReduceMin or ReduceMax
     over every axis (any calibration), or only to a graph output of a histogram calibration (entropy, percentile,
     distribution) run by patch 7's loop, which hands its outputs to the histograms and nowhere else; the reductions
     then read the blocked tensor, and a blocked output is fetched under the output's name. The session runs that
     model with no further optimization. Only where no padding can arise: MLAS blocks channels by 8 or 16, so the
     channel count must be a multiple of 16 (a fetched output's shape is checked as well: ``unpadded``); other
     tensors keep their ``ReorderOutput``. Not on another provider, not for per-node calibration; a model saved with
     external data is fine. The values come from other kernels than at the extended level, so they round differently:
     on the test models the histograms and scales are the full level's bin for bin and bit for bit (tensors
     reordered, as usual), and the scales an ulp or two from ModelOpt's own (tested: within 1e-6 relative).
     ``PatchNotes`` says how many tensors were read blocked. Measured (RESULTS.md, ``benchmarks/qdq_calibration.py
     --time-only --bevformer --method entropy --variants shipped without-blocked-fetch``): on BEVFormer-tiny 55 of 88
     fetched tensors come blocked; entropy calibration costs 1.20-1.25x a plain frame per frame (slope, two runs;
     steady interval 1.17-1.18x, of which the run 1.05-1.06x) against 1.33-1.41x (1.32-1.33x, 1.19-1.20x) without the
     patch, fixed overhead 20.1 s against 20.0 s; scales within 6e-7. "max" (``--method max``, 55 of 82 reduced
     tensors blocked): 1.10x against 1.20x, scales within 7e-7.

Not patched but handled by the caller (`run_in_private_dir`): ModelOpt rewrites its input file in place and drops
``sym_shape_infer_temp.onnx`` and ``<uuid>.data`` in the current directory, so it runs on a private copy with
the working directory switched to a temporary folder. Its API defaults that differ from its CLI
(``high_precision_dtype``, ``dq_only``, ``calibration_eps``) are always passed explicitly by the backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import logging
import operator
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


@contextlib.contextmanager
def _replaced(*swaps: tuple[Any, str, Any]) -> Iterator[None]:
    """Each ``(owner, attribute, value)`` set for the duration of the block, the previous values put back after it
    (in reverse order), also when the block raises."""
    before = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, value in swaps:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(before):
            setattr(owner, name, value)


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


# onnxruntime's tables of which quantizer handles which op type (ModelOpt adds the custom ops it quantizes and
# removes Concat, Relu, Reshape and others)
_ORT_REGISTRIES = ("onnxruntime.quantization.registry",
                   ("CommonOpsRegistry", "IntegerOpsRegistry", "QLinearOpsRegistry", "QDQRegistry"))


@contextlib.contextmanager
def onnxruntime_quantization_restored() -> Iterator[None]:
    """Undo, on exit, any change made inside the block to onnxruntime's quantization classes, calibrate module and
    op-type registries."""
    owners: list[Any] = []
    for mod_name, classes in _ORT_PATCHED:
        mod = importlib.import_module(mod_name)
        owners.append(mod)
        owners.extend(getattr(mod, c) for c in classes if hasattr(mod, c))
    snapshot = [(o, dict(vars(o))) for o in owners]
    registries = importlib.import_module(_ORT_REGISTRIES[0])
    tables = [(t, dict(t)) for t in (getattr(registries, n) for n in _ORT_REGISTRIES[1]) if isinstance(t, dict)]
    try:
        yield
    finally:
        for table, before in tables:
            table.clear()
            table.update(before)
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
            if not _PREOPTIMIZED.get():  # patch 11's model is optimized already
                sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            sess_options.enable_cpu_mem_arena = True
        original(self, path_or_bytes, sess_options, *args, **kwargs)

    with _replaced((cls, "__init__", init)):
        yield


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
            if t is None or not t.type.tensor_type.HasField("shape") or not t.type.tensor_type.shape.dim:
                continue  # rank unknown, or a scalar (nothing to concatenate along): keeps its own output
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
    """ModelOpt's ``MinMaxCalibrater.collect_data`` with the per-sample work cut to a running
    minimum and maximum per gathered output (patch 5)."""
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
        lo: list | None = None
        hi: list = []
        while True:
            inputs = data_reader.get_next()
            if not inputs:
                break
            values = session.run(fetch, inputs)  # only the reductions: the model's own outputs are never used
            if lo is None:
                lo, hi = values, [v.copy() for v in values]  # the session's outputs are ours to update
                continue
            for a, b, v in zip(lo, hi, values):  # one call each per gathered output: a handful a sample
                np.minimum(a, v, out=a)
                np.maximum(b, v, out=b)
        if lo is None:
            return  # no sample: nothing recorded, as in ModelOpt's loop
        # each gathered reduction as the shape [1] onnxruntime's Reshape to [-1] gives it; the others as fetched
        lo, hi = ([x.reshape(-1)[j:j + 1] for x, (_, m) in zip(xs, gathered) for j in range(len(m))]
                  + xs[len(gathered):] for xs in (lo, hi))
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
    # ModelOpt installs its own augment_graph only for per-node calibration, whose collector is not this one
    with _replaced((mod, _MINMAX_COLLECTOR[1], _running_minmax_collector(collector)),
                   (MinMaxCalibrater, "augment_graph", _gathering_augmenter(augmenter))):
        yield


# -- patch 6: histogram calibration without copies, bins assigned as numpy assigns them ------------------------

_VALUE_COLLECTOR = ("modelopt.onnx.quantization.ort_patching", "_collect_value")
_BLOCK = 1 << 16  # elements per step, as numpy's histogram takes them: temporaries stay in cache
_NATIVE_MIN = 1 << 10  # below this many values, np.histogram (its per-call cost is lower than the compiled path's)


def _bin_estimate(x: Any, first: Any, denom: Any, bins: int, work: dict | None = None) -> tuple:
    """numpy's first guess at the bins of ``x`` (already in the edges' dtype) for equal-width bins: the quotient,
    truncated, and the top edge's values moved into the last bin. The same operations on operands of the same
    types as in ``np.histogram``, so the same values; ``work`` holds reusable output buffers of the dtypes those
    operations produce (fresh temporaries of a block's size cost page faults every time)."""
    import numpy as np

    n = x.shape[0]

    def out(key: str) -> Any:
        return None if work is None else work[key][:n]

    # one sequence of operations for both uses (the elements' guesses and the bounds computed from the edges): the
    # bounds are valid only because the two agree to the bit
    shifted = np.subtract(x, first, dtype=np.result_type(x, first), out=out("shifted"))
    f = np.divide(shifted, denom, out=out("f"))
    np.multiply(f, bins, out=f)  # bins is a Python int: f keeps its dtype, as in numpy's f * bins
    idx = np.empty(n, np.intp) if work is None else work["idx"][:n]
    np.copyto(idx, f, casting="unsafe")  # what astype(np.intp) does: truncation
    np.subtract(idx, 1, out=idx, where=idx == bins)
    return f, idx


_WORK = threading.local()


def _estimate_buffers(dtype: Any, first: Any, denom: Any, bins: int) -> dict:
    """Buffers for ``_bin_estimate`` on blocks of ``dtype``, each of the dtype its step produces without one; kept
    per thread and reused (a fresh block-sized array is a fresh mapping, page-faulted in on every call)."""
    import numpy as np

    probe = np.zeros(1, dtype)
    shifted = np.subtract(probe, first, dtype=np.result_type(probe, first))
    f = (shifted / denom) * bins
    cache = getattr(_WORK, "buffers", None)
    if cache is None:
        cache = _WORK.buffers = {}
    key = (shifted.dtype, f.dtype, _BLOCK)
    if key not in cache:
        cache[key] = {"shifted": np.empty(_BLOCK, shifted.dtype), "f": np.empty(_BLOCK, f.dtype),
                      "idx": np.empty(_BLOCK, np.intp)}
    return cache[key]


def _load_native() -> Any:
    """The compiled passes (qdqkit/_histogram.c, built by ``pip install``), or None where they were not built."""
    if os.environ.get("QDQKIT_NATIVE_HISTOGRAM", "1") == "0":
        return None
    try:
        from qdqkit import _histogram
    except ImportError:
        return None
    return _histogram


_NATIVE = _load_native()


def _native_modes(edge_dtype: Any, work: dict, denom: Any) -> tuple | None:
    """The compiled counts' arguments that say in which dtypes numpy computes the difference and the quotient of
    ``_bin_estimate`` for edges of ``edge_dtype`` (the dtypes of ``work``, the buffers ``_estimate_buffers`` made
    by asking numpy), or None where the compiled code has no such variant (or is missing). ``first`` and
    ``denom`` then go over as Python floats and are converted back to those dtypes in C, as numpy converts them:
    exactly, or for a float32 difference from a Python float, to nearest."""
    import numpy as np

    if _NATIVE is None:
        return None
    shifted, f = work["shifted"].dtype, work["f"].dtype
    known = {(np.dtype(a), np.dtype(b), np.dtype(c)) for a, b, c in
             (("f4", "f4", "f4"), ("f4", "f4", "f8"), ("f8", "f8", "f8"))}
    if (np.dtype(edge_dtype), shifted, f) not in known or np.dtype(type(denom)).kind != "f" or \
            (f == np.float32 and np.float32(denom) != denom):
        return None
    return shifted == np.float64, f == np.float64


def _histogram_setup(piece: Any, bins: int, range_: tuple) -> tuple:
    """What patch 6's counting over ``range_`` needs, as numpy's histogram makes it for data of ``piece``'s dtype:
    empty counts and the edges (numpy's own, with its argument checks), the range as numpy uses it (an empty one
    widened), the difference of its ends, the guess buffers, and the compiled counts' modes (or None)."""
    import numpy as np

    hist, edges = np.histogram(piece[:0], bins, range=range_)
    first, last = range_
    if first == last:  # numpy widens an empty range the same way before it computes anything
        first, last = first - 0.5, last + 0.5
    denom = np.subtract(last, first, dtype=np.result_type(last, first))
    work = _estimate_buffers(edges.dtype, first, denom, bins)
    return hist, edges, first, last, denom, work, _native_modes(edges.dtype, work, denom)


def _numpy_histogram(pieces: list, bins: int, range_: tuple) -> tuple:
    """``np.histogram`` of each piece over ``range_``, the counts added."""
    import numpy as np

    hist, edges = np.histogram(pieces[0], bins, range=range_)
    for piece in pieces[1:]:
        hist += np.histogram(piece, bins, range=range_)[0]
    return hist, edges


def _uniform_histogram(pieces: list, bins: int, range_: tuple, extremes: list) -> tuple:
    """``np.histogram(np.concatenate(pieces), bins, range=range_)``, computed piece by piece (patch 6).

    Bin edges, their dtype and every argument check are numpy's own (a histogram of no data). numpy then guesses
    each element's bin from a quotient (``_bin_estimate``) and corrects the guess where it disagrees with the
    edges: one bin down where the value lies below the guessed bin's lower edge, otherwise one bin up where it
    lies on or above the next edge (not from the last bin). Here the guess is the same, and the edges are
    compared only for the elements that can need a correction: the quotient, hence the guess, never decreases as
    the value grows (every step is a correctly rounded operation by a positive constant, or a truncation), so a
    value below its guessed bin ``k``'s lower edge has a quotient no greater than that of the float just below
    that edge, i.e. a fractional part (quotient - k) no greater than the largest such over all bins; likewise
    upwards. Those two bounds are computed from the edges with the same operations, and elements whose fractional
    part lies strictly between them keep their guess. Where the guesses are far from the edges (more than half a
    bin), every element is compared. The in-range mask is skipped for a piece whose minimum and maximum
    (``extremes``) pass numpy's comparisons, and counts add up over pieces, so nothing is concatenated.
    """
    import numpy as np

    size = sum(p.size for p in pieces)
    # non-float data is numpy's alone (the edges numpy makes are floating point whatever the data, so only the
    # data's kind decides); so are small tensors where the compiled code is missing (below a block, the bounds
    # below cost more than they save) and tiny ones (where the calls cost more than the counting)
    if any(p.dtype.kind != "f" for p in pieces) or size < _NATIVE_MIN or (size < _BLOCK and _NATIVE is None):
        return _numpy_histogram(pieces, bins, range_)
    bins = operator.index(bins)  # as numpy takes it: a Python int, which leaves a float's dtype as it is
    hist, edges, first, last, denom, work, native = _histogram_setup(pieces[0], bins, range_)
    left = []  # (piece, inside) for numpy's code
    for piece, (lo, hi) in zip(pieces, extremes):
        ends = np.array([lo, hi], dtype=piece.dtype)
        inside = bool(np.logical_and.reduce((ends >= first) & (ends <= last)))
        if inside and native is not None and piece.dtype.itemsize <= edges.dtype.itemsize and \
                _NATIVE.counts(piece, edges, float(first), float(denom), bins, *native, hist):
            continue
        left.append((piece, inside))
    if not left:
        return hist, edges
    if size < _BLOCK:  # small: what the compiled code did not count, numpy's own histogram counts
        hist += _numpy_histogram([piece for piece, _ in left], bins, range_)[0]
        return hist, edges
    # an upper edge of +inf for the last bin says "not from the last bin"
    upper = edges[1:].copy()
    upper[-1] = np.inf
    below_bound = above_bound = None
    k = np.arange(bins, dtype=np.intp)
    f_low, _ = _bin_estimate(np.nextafter(edges[:-1], -np.inf), first, denom, bins)
    f_high, _ = _bin_estimate(edges[1:-1], first, denom, bins)
    # within half a bin of k, f - k is exact (Sterbenz), as it is for the elements' f - guess
    if np.all(np.abs(f_low - k) <= 0.5) and np.all(np.abs(f_high - (k[:-1] + 1)) <= 0.5):
        below_bound = np.max(f_low - k)
        above_bound = np.min(f_high - k[:-1]) if bins > 1 else np.inf
    for piece, inside in left:
        for i in range(0, piece.size, _BLOCK):
            x = piece[i:i + _BLOCK]
            if not inside:
                keep = x >= first
                keep &= x <= last
                if not np.logical_and.reduce(keep):
                    x = x[keep]
            x = x.astype(edges.dtype, copy=False)
            f, idx = _bin_estimate(x, first, denom, bins, work)
            counts = np.bincount(idx, minlength=bins)  # a negative guess raises here, as in numpy
            if counts.size != bins:  # a guess past the edges: numpy's own indexing raises
                edges.take(idx)
            hist += counts
            if below_bound is None:
                near = slice(None)
            else:
                part = f - idx
                near = part <= below_bound
                near |= part >= above_bound
                if not near.any():
                    continue
            xs, guess = x[near], idx[near]
            down = xs < edges.take(guess)
            up = xs >= upper.take(guess)  # never where `down` holds: the edges increase (numpy checked)
            if down.any():
                moved = guess[down]
                hist -= np.bincount(moved, minlength=bins)
                hist += np.bincount(moved - 1, minlength=bins)  # -1 raises here, as in numpy
            if up.any():
                moved = guess[up]
                hist -= np.bincount(moved, minlength=bins)
                hist += np.bincount(moved + 1, minlength=bins)
    return hist, edges


def _merged_histogram(old: tuple, pieces: list, extremes: list, new_min: Any, new_max: Any,
                      new_threshold: Any) -> tuple:
    """onnxruntime's ``HistogramCollector.merge_histogram`` (1.24), its histograms taken by
    ``_uniform_histogram`` (patch 6). Same arithmetic on the same operands, so the same bins and threshold."""
    old_hist, old_hist_edges, old_min, old_max, old_threshold = old
    if new_threshold <= old_threshold:
        new_hist, _ = _uniform_histogram(pieces, len(old_hist), (-old_threshold, old_threshold), extremes)
        return new_hist + old_hist, old_hist_edges, min(old_min, new_min), max(old_max, new_max), old_threshold
    if old_threshold == 0:
        hist, hist_edges = _uniform_histogram(pieces, len(old_hist), (-new_threshold, new_threshold), extremes)
        hist += old_hist
    else:
        old_num_bins = len(old_hist)
        old_stride = 2 * old_threshold / old_num_bins
        half_increased_bins = int((new_threshold - old_threshold) // old_stride + 1)
        new_num_bins = old_num_bins + 2 * half_increased_bins
        new_threshold = half_increased_bins * old_stride + old_threshold
        hist, hist_edges = _uniform_histogram(pieces, new_num_bins, (-new_threshold, new_threshold), extremes)
        hist[half_increased_bins:new_num_bins - half_increased_bins] += old_hist
    return hist, hist_edges, min(old_min, new_min), max(old_max, new_max), new_threshold


def _counted_within(old: tuple, pieces: list) -> tuple | None:
    """Every piece's extremes and, where all of them could be placed, their counts over the old histogram's range
    (else None), in one compiled pass over each piece (patch 6); None where that pass is not compiled here.

    From the second sample on, onnxruntime's merge histograms a tensor over its old range whenever the new extremes
    lie inside it: ``_uniform_histogram(pieces, len(old_hist), (-old_threshold, old_threshold))``, after numpy's
    two passes for the extremes. Here the counts are taken first, over that range, with the extremes in the same
    pass; the caller keeps them only where the extremes show that the merge uses that range. Where a value cannot
    be placed (outside the old range, NaN, inf), the pass goes on for the extremes alone, which the caller's merge
    then uses. A zero extreme's sign is not numpy's (which zero a reduction returns depends on its order): the
    caller asks numpy again where that sign shows, i.e. where the zero becomes the merged extreme. NaN extremes
    stand for numpy's (NaN, as a reduction over NaN gives)."""
    import numpy as np

    old_hist, _, _, _, old_threshold = old
    bins, first, last = len(old_hist), -old_threshold, old_threshold
    if _NATIVE is None or sum(p.size for p in pieces) < _NATIVE_MIN or pieces[0].dtype != np.float32 or \
            first == last:
        return None
    hist, edges, _, _, denom, _, native = _histogram_setup(pieces[0], bins, (first, last))
    if native is None:
        return None
    extremes, placed = [], True
    for piece in pieces:
        found = _NATIVE.counts_extremes(piece, edges, float(first), float(denom), bins, *native, hist)
        if found is None:
            return None
        placed = placed and found[0]
        extremes.append(tuple(piece.dtype.type(v) for v in found[1:]))
    return extremes, hist if placed else None


@functools.cache
def _histogram_threads() -> Any:
    """A small thread pool, made once, for the histograms of different tensors: numpy's arithmetic releases the
    GIL."""
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ThreadPoolExecutor(max_workers=max(1, min(4, cores)), thread_name_prefix="qdqkit-histogram")


def _direct_value_collector(original: Any, ort_merge: Any) -> Any:
    """ModelOpt's ``HistogramCollector.collect_value`` without flattening, concatenating or masking copies, with
    numpy's bin assignment replayed in fewer steps, tensors in parallel (patch 6). Anything unusual goes to the
    original, per tensor."""
    import numpy as np

    def histogram_of(collector: Any, own_merge: bool, tensor: str, data: Any) -> tuple | None:
        """The new ``histogram_dict`` entry of one tensor, or None where ModelOpt's own code must do it."""
        pieces = [np.asarray(a).reshape(-1) for a in data] if isinstance(data, list) and data else []
        pieces = [p for p in pieces if p.size] if len({p.dtype for p in pieces}) == 1 else []
        if not pieces or pieces[0].dtype.kind != "f":
            return None  # empty, mixed or non-float data
        old = collector.histogram_dict.get(tensor)
        if old is not None and not own_merge:
            return None
        counted = _counted_within(old, pieces) if old is not None else None
        extremes = counted[0] if counted else [(np.min(p), np.max(p)) for p in pieces]
        if not all(np.isfinite(lo) and np.isfinite(hi) for lo, hi in extremes):
            return None  # NaN or inf (ModelOpt replaces those extremes)
        min_value, max_value = extremes[0]
        if len(extremes) > 1:
            min_value, max_value = min(lo for lo, _ in extremes), max(hi for _, hi in extremes)
            if min_value == 0 or max_value == 0:
                return None  # which zero (+0 or -0) a reduction returns depends on numpy's order
        threshold = max(abs(min_value), abs(max_value))
        if old is not None:
            old_hist, old_edges, old_min, old_max, old_threshold = old
            # the fused pass's zero extreme has no numpy sign; it shows only where it replaces the old extreme
            if counted and min_value == 0 and old_min > 0:
                min_value = np.min(pieces[0])
            if counted and max_value == 0 and old_max < 0:
                max_value = np.max(pieces[0])
            if counted and counted[1] is not None and threshold <= old_threshold:  # the merge into the old range
                return counted[1] + old_hist, old_edges, min(old_min, min_value), max(old_max, max_value), \
                    old_threshold
            return _merged_histogram(old, pieces, extremes, min_value, max_value, threshold)
        range_max = float(threshold)  # as ModelOpt passes it: edges and bins computed from a Python float
        hist, edges = _uniform_histogram(pieces, collector.num_bins, (-range_max, range_max), extremes)
        return hist, edges, min_value, max_value, threshold

    def collect_value(collector: Any, name_to_arr: dict) -> None:
        own_merge = getattr(type(collector), "merge_histogram", None) is ort_merge
        items = list(name_to_arr.items())
        # every tensor's entry is computed from its old one only, so they can be computed at once (large ones in
        # the pool, small ones here, where a hand-over would cost more than they take); they are stored in
        # ModelOpt's order afterwards
        large = [sum(getattr(a, "size", 0) for a in data) >= _BLOCK if isinstance(data, list) else False
                 for _, data in items]
        pool = _histogram_threads() if sum(large) > 1 else None
        entries: list = [pool.submit(histogram_of, collector, own_merge, *item) if pool and big else None
                         for item, big in zip(items, large)]
        entries = [e.result() if e is not None else histogram_of(collector, own_merge, *item)
                   for item, e in zip(items, entries)]
        for (tensor, data), entry in zip(items, entries):
            if entry is None:
                original(collector, {tensor: data})
            else:
                collector.histogram_dict[tensor] = entry

    collect_value.qdqkit_original = original  # type: ignore[attr-defined]
    return collect_value


@contextlib.contextmanager
def calibration_histograms_direct() -> Iterator[None]:
    """ModelOpt's histogram calibrations (entropy, percentile without symmetry, distribution) inside the block
    build their histograms without copies of the observed tensors, bin for bin as before (patch 6), and release
    each sample's tensors before the next sample runs (patch 7)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    mod = importlib.import_module(_VALUE_COLLECTOR[0])
    collector = getattr(mod, _VALUE_COLLECTOR[1])
    loop = getattr(mod, _HISTOGRAM_LOOP[1])
    if hasattr(collector, "qdqkit_original"):
        yield
        return
    with _replaced((mod, _VALUE_COLLECTOR[1], _direct_value_collector(collector, HistogramCollector.merge_histogram)),
                   (mod, _HISTOGRAM_LOOP[1], _releasing_histogram_loop(loop))):
        yield


# -- patch 7: each sample's observed tensors released before the next sample runs -----------------------------

_HISTOGRAM_LOOP = ("modelopt.onnx.quantization.ort_patching", "_collect_data_histogram_calibrator")


def _collect_one_sample(calibrator: Any, outputs: list) -> None:
    """ModelOpt's per-sample step of its histogram calibration loop: the session's outputs by name, the tensors of
    each Concat group added to each member's list (the group's other members, in the group's order), those to
    calibrate handed to the collector (made on the first sample, with the calibrator's settings), and the
    calibrator's record of outputs cleared. Everything it builds is local, so it is gone on return."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    by_name = dict(zip((o.name for o in calibrator.infer_session.get_outputs()), outputs))
    for name, channels in getattr(calibrator, "qdqkit_blocked", {}).items():
        unpadded(name, by_name[name], channels)
    lists = {name: [value] for name, value in by_name.items()}
    for tensor, group in (calibrator.group_qdq_tensors or {}).items():
        lists[tensor].extend(by_name[other] for other in group if other != tensor and other in by_name)
    wanted = {name: values for name, values in lists.items() if name in calibrator.tensors_to_calibrate}
    if not calibrator.collector:
        calibrator.collector = HistogramCollector(
            method=calibrator.method, symmetric=calibrator.symmetric, num_bins=calibrator.num_bins,
            num_quantized_bins=calibrator.num_quantized_bins, percentile=calibrator.percentile,
            scenario=calibrator.scenario)
    calibrator.collector.collect(wanted)
    calibrator.clear_collected_data()


def _releasing_histogram_loop(original: Any) -> Any:
    """ModelOpt's ``HistogramCalibrater.collect_data`` (its histogram calibrations, one sample at a time), with the
    sample's outputs released before the next sample runs (patch 7)."""

    def collect_data(calibrator: Any, data_reader: Any) -> None:
        while True:
            inputs = data_reader.get_next()
            if not inputs:
                break
            # `inputs` stays referenced until the sample is collected: onnxruntime returns an observed graph input
            # as an array over the feed's own memory, without a reference to it
            _collect_one_sample(calibrator, calibrator.infer_session.run(None, inputs))

    collect_data.qdqkit_original = original  # type: ignore[attr-defined]
    return collect_data


# -- patch 8: only the ranges the quantizer reads are calibrated ---------------------------------------------------

_QUANTIZE_STATIC = ("modelopt.onnx.quantization.int8", "quantize_static")
_SHAPES_LOADER = ("modelopt.onnx.quantization.ort_patching", "load_model_with_shape_infer")


class _RangeReads(dict):
    """The quantizer's quantization parameters (tensor -> parameters), recording which tensors it looks up. Whatever
    lists or copies the whole (iteration, keys, items, values, copy, pickling) sets ``listed``: then no tensor can
    be said to be unread."""

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.read: set[str] = set()
        self.listed = False

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def _listing(name: str) -> Any:  # type: ignore[misc]
        def listing(self: Any, *args: Any) -> Any:
            self.listed = True
            return getattr(super(_RangeReads, self), name)(*args)

        return listing

    __iter__ = _listing("__iter__")
    keys = _listing("keys")
    items = _listing("items")
    values = _listing("values")
    copy = _listing("copy")
    __reduce_ex__ = _listing("__reduce_ex__")
    del _listing


@contextlib.contextmanager
def _recording_range_reads(unit: frozenset = frozenset()) -> Iterator[list]:
    """Every ``QDQQuantizer`` made inside the block keeps its quantization parameters in a ``_RangeReads``; the
    list yielded receives each of them. The tensors of ``unit`` that calibration left out get the range [-1, 1]
    first."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    made: list[_RangeReads] = []
    original = QDQQuantizer.calc_graph_quant_params

    def calc_graph_quant_params(quantizer: Any) -> dict:
        ranges = quantizer.tensors_range
        for tensor in sorted(unit):
            if ranges is not None and tensor not in ranges:
                ranges.data[tensor] = _unit_range()
        made.append(_RangeReads(original(quantizer)))
        return made[-1]

    with _replaced((QDQQuantizer, "calc_graph_quant_params", calc_graph_quant_params)):
        yield made


class _UnitRanges:
    """A calibrator that calibrates nothing: each tensor the real one would calibrate gets the range [-1, 1]
    (patch 8's dry run)."""

    def __init__(self, model_path: Any, nodes_to_calibrate: Any = None, *args: Any, **kwargs: Any) -> None:
        from onnxruntime.quantization.calibrate import CalibraterBase, CalibrationMethod

        mod = importlib.import_module(_SHAPES_LOADER[0])
        model = getattr(mod, _SHAPES_LOADER[1])(Path(model_path))
        chooser = CalibraterBase.__new__(CalibraterBase)  # only what ModelOpt's choice of tensors reads
        chooser.op_types_to_calibrate = nodes_to_calibrate
        self.tensors, _ = CalibraterBase.select_tensors_to_calibrate(chooser, model)
        self.method = kwargs.get("calibrate_method", CalibrationMethod.MinMax)

    def collect_data(self, data_reader: Any) -> None:
        pass

    def compute_data(self) -> Any:
        from onnxruntime.quantization.calibrate import TensorsData

        return TensorsData(self.method, {t: _unit_range() for t in sorted(self.tensors)})


_KEPT_INFERRED_BYTES = 512 * 2**20  # larger models are loaded again rather than held twice in memory


@contextlib.contextmanager
def _shapes_inferred_once() -> Iterator[None]:
    """Inside the block, ModelOpt's loader with shape inference infers each unchanged file's shapes once and hands
    out copies (ModelOpt loads its input that way twice a quantization, patch 8's dry run twice more); a model
    over ``_KEPT_INFERRED_BYTES`` is loaded anew each time instead."""
    import onnx

    from qdqkit.model import proto_size

    mod = importlib.import_module(_SHAPES_LOADER[0])
    original = getattr(mod, _SHAPES_LOADER[1])
    done: dict[tuple, Any] = {}

    def load(model_path: Any) -> Any:
        st = os.stat(model_path)
        key = (os.path.realpath(model_path), st.st_mtime_ns, st.st_size)
        if key not in done:
            model = original(model_path)
            if proto_size(model) > _KEPT_INFERRED_BYTES:
                return model
            done[key] = model
        copy = onnx.ModelProto()
        copy.CopyFrom(done[key])
        return copy

    with _replaced((mod, _SHAPES_LOADER[1], load)):
        yield


# -- patch 9: shape probes answered by shape inference -------------------------------------------------------------

_EXTENDED_OUTPUTS = ("modelopt.onnx.quantization.graph_utils", "get_extended_model_outputs")


class ShapeOnly:
    """An output of ModelOpt's shape probe as patch 9 answers it: its shape and dtype, no values. Anything that
    would read values (conversion to an array, indexing, arithmetic) raises, so a ModelOpt that starts to use them
    fails loudly instead of computing from nothing."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape, self.dtype = shape, dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("qdqkit patch 9: ModelOpt read the values of a shape probe's output; qdqkit answers those "
                           "probes with shapes only. Quantize with patched_modelopt(shape_probes=False)")

    def __repr__(self) -> str:
        return f"ShapeOnly({self.shape}, {self.dtype})"


def _static_outputs(model: Any) -> dict[str, ShapeOnly] | None:
    """Every graph output of ``model`` with its shape and type from ONNX shape inference (on a copy without the
    large weights and without its declared intermediate shapes), or None where one of them is not fully static or
    inference fails or disagrees with a declared output shape."""
    import numpy as np
    from onnx import helper

    from qdqkit.model import inferred_structure, static_shapes

    try:
        # fresh and strict: shapes the ops derive, never a stale declared one (onnx would merge leniently)
        inferred = inferred_structure(model, fresh=True, strict_mode=True, data_prop=True)
    except Exception:  # onnx raises several kinds here (schema, type, merge errors); any one means "no answer"
        return None
    # an output ModelOpt added has no type of its own; inference types it in value_info (or in the output)
    shapes = static_shapes(inferred.graph)
    out: dict[str, ShapeOnly] = {}
    for o in model.graph.output:
        if o.name not in shapes:
            return None
        dims, elem_type = shapes[o.name]
        out[o.name] = ShapeOnly(dims, np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))
    return out


def _answering_shape_probes(original: Any, answered: list) -> Any:
    def get_extended_model_outputs(onnx_path: Any, extended_model: Any, *args: Any, **kwargs: Any) -> dict:
        shapes = _static_outputs(extended_model)
        answered.append(shapes is not None)
        return shapes if shapes is not None else original(onnx_path, extended_model, *args, **kwargs)

    get_extended_model_outputs.qdqkit_original = original  # type: ignore[attr-defined]
    return get_extended_model_outputs


@contextlib.contextmanager
def shape_probes_inferred() -> Iterator[list]:
    """Inside the block, ModelOpt's shape probes (the GEMV/small-GEMM and MHA checks) get their outputs' shapes from
    ONNX shape inference where every one is static, instead of an inference run (patch 9). Yields a list that
    receives, per probe, whether it was answered that way."""
    mod = importlib.import_module(_EXTENDED_OUTPUTS[0])
    current = getattr(mod, _EXTENDED_OUTPUTS[1])
    answered: list[bool] = []
    if hasattr(current, "qdqkit_original"):
        yield answered
        return
    with _replaced((mod, _EXTENDED_OUTPUTS[1], _answering_shape_probes(current, answered))):
        yield answered


class PatchNotes:
    """What patches 8, 9 and 11 did in the INT8 quantizations of a ``patched_modelopt`` block, as report lines (read
    them after ModelOpt has run)."""

    def __init__(self, calls: list, probes: list, blocked: list) -> None:
        self._calls, self._probes, self._blocked = calls, probes, blocked

    def lines(self) -> list[str]:
        out = [line for line in (c.note() for c in self._calls) if line]
        for session in self._blocked:
            if isinstance(session, str):
                out.append(f"calibration at onnxruntime's extended optimization level: {session} "
                           "(qdqkit patch 11 off for the session)")
            else:
                out.append(f"calibration at onnxruntime's full optimization level, {session[1]} of the "
                           f"{session[2]} {session[0]} tensors in onnxruntime's blocked channel layout "
                           "(qdqkit patch 11)")
        if self._probes:
            answered = sum(self._probes)
            out.append(f"{answered} of ModelOpt's {len(self._probes)} shape probes answered by shape inference "
                       "instead of an inference run (qdqkit patch 9)")
        return out


class _Int8Call:
    """What patch 8 learns during one call of ModelOpt's INT8 quantization: the inputs its placement marks for Q/DQ
    removal after the quantizer has run (None: not seen), the tensors given a unit range instead of a calibrated
    one because that removal takes their Q/DQ away again, and how many tensors ModelOpt would have calibrated and
    how many were (None where patch 8 left the call as it was)."""

    current: _Int8Call | None = None

    def __init__(self) -> None:
        self.no_quantize_inputs: list | None = None
        self.unit_ranges: set[str] = set()
        self.observed: int | None = None
        self.calibrated: int | None = None
        self.skipped: str | None = None  # why patch 8 left the call as it was

    def note(self) -> str | None:
        """One line for a report, or None where patch 8 did not apply."""
        if self.skipped is not None:
            return f"every tensor ModelOpt observes was calibrated: {self.skipped} (qdqkit patch 8 off for the call)"
        if self.observed is None:
            return None
        removed = f" or ({len(self.unit_ranges)}) whose Q/DQ it removes afterwards" if self.unit_ranges else ""
        return (f"calibrated {self.calibrated} of the {self.observed} tensors ModelOpt observes; the other "
                f"{self.observed - self.calibrated} are tensors whose ranges its quantizer does not read{removed} "
                "(qdqkit patch 8; the same model)")


def _unit_range() -> Any:
    import numpy as np
    from onnxruntime.quantization.calibrate import TensorData

    return TensorData(lowest=np.float32(-1), highest=np.float32(1))


def _dry_run(original: Any, model_input: Any, args: tuple, kwargs: dict) -> tuple[set[str], Any] | str:
    """The tensors whose ranges ModelOpt's quantizer reads when ``original`` (ModelOpt's ``quantize_static``) runs
    with these arguments, and the model it would write (kept in memory instead), found by running it with a
    calibrator that calibrates nothing (every range [-1, 1]); where that cannot tell, why (the dry run failed, or
    the quantizer listed every range)."""
    from onnxruntime.quantization import calibrate
    from onnxruntime.quantization.onnx_model import ONNXModel

    written: list[Any] = []
    try:
        with _replaced((calibrate, "create_calibrator", _UnitRanges),
                       (ONNXModel, "save_model_to_file", lambda model, *_: written.append(model.model))), \
                _recording_range_reads() as made:
            original(model_input, os.devnull, None, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - then patch 8 stays off for the call, and the report says why
        return f"its dry run failed ({type(e).__name__}: {e})"
    if len(made) != 1 or made[0].listed or len(written) != 1:
        return "its dry run could not tell which ranges the quantizer reads"
    return set(made[0].read), written[0]


def _removed_afterwards(dry_model: Any, no_quantize_inputs: list) -> set[str]:
    """The tensors whose Q/DQ ModelOpt's post-processing of the quantizer's output (``remove_partial_input_qdq``,
    then the graph's clean-up) takes away again, shown on the dry run's output."""
    import onnx_graphsurgeon as gs
    from modelopt.onnx.quantization.graph_utils import remove_partial_input_qdq

    before = {n.input[0] for n in dry_model.graph.node if n.op_type == "QuantizeLinear"}
    graph = gs.import_onnx(dry_model)
    remove_partial_input_qdq(graph, no_quantize_inputs)
    graph.cleanup()
    return before - {n.inputs[0].name for n in graph.nodes if n.op == "QuantizeLinear"}


def _sharing_closed(tensors: set[str], groups: dict) -> set[str]:
    """``tensors`` with every tensor that shares a range with one of them (ModelOpt's ``group_qdq_tensors``)."""
    closed = set(tensors)
    for tensor, group in groups.items():
        if {tensor, *group} & tensors:
            closed |= {tensor, *group}
    return closed


@contextlib.contextmanager
def _calibrator_narrowed(calibrated: set[str]) -> Iterator[tuple[set[str], list]]:
    """Calibrators made inside the block calibrate only ``calibrated`` of the tensors they choose; yields the set
    that receives the tensors left out and the list that receives (chosen, kept) counts per calibrator."""
    from onnxruntime.quantization.calibrate import CalibraterBase

    left_out: set[str] = set()
    counts: list[tuple[int, int]] = []
    choose = CalibraterBase.select_tensors_to_calibrate

    def select_tensors_to_calibrate(calibrator: Any, model: Any) -> tuple:
        tensors, value_infos = choose(calibrator, model)
        left_out.update(tensors - calibrated)
        counts.append((len(tensors), len(tensors & calibrated)))
        return tensors & calibrated, value_infos

    with _replaced((CalibraterBase, "select_tensors_to_calibrate", select_tensors_to_calibrate)):
        yield left_out, counts


def _calibrating_only(original: Any) -> Any:
    """ModelOpt's ``quantize_static`` calibrating only the tensors whose ranges its quantizer reads and its
    post-processing keeps (patch 8)."""

    def quantize_static(model_input: Any, model_output: Any, calibration_data_reader: Any, *args: Any,
                        **kwargs: Any) -> Any:
        call = _Int8Call.current
        with _shapes_inferred_once():
            dry = _dry_run(original, model_input, args, kwargs)
            if isinstance(dry, str):
                if call is not None:
                    call.skipped = dry
                return original(model_input, model_output, calibration_data_reader, *args, **kwargs)
            read, dry_model = dry
            groups = (kwargs.get("extra_options") or {}).get("group_qdq_tensors") or {}
            needed = _sharing_closed(read, groups)
            unit: set[str] = set()
            if call is not None and call.no_quantize_inputs is not None:
                removed = _removed_afterwards(dry_model, call.no_quantize_inputs) & read
                # a shared range is calibrated for all of its tensors or none
                unit = removed - _sharing_closed(needed - removed, groups)
            error: Exception | None = None
            try:
                with _calibrator_narrowed(needed - unit) as (left_out, counts), \
                        _recording_range_reads(frozenset(unit)) as made:
                    result = original(model_input, model_output, calibration_data_reader, *args, **kwargs)
            except Exception as e:  # a missing range may be what broke it: decided below
                error = e
            if all(not r.listed and not r.read & (left_out - unit) for r in made):
                if error is not None:
                    raise error
                if call is not None:
                    call.unit_ranges |= unit
                    if len(counts) == 1:
                        call.observed, call.calibrated = counts[0]
                return result
        # the quantizer asked for a range the dry run said it would not: calibrate everything after all
        message = "ModelOpt's quantizer read a range that qdqkit's patch 8 had left uncalibrated"
        if not hasattr(calibration_data_reader, "rewind"):
            raise RuntimeError(f"{message}; quantize with modelopt_compat.patched_modelopt(read_ranges_only=False) "
                               "and please report this")
        warnings.warn(f"{message}; calibrating again with every range (please report this)", stacklevel=2)
        calibration_data_reader.rewind()
        return original(model_input, model_output, calibration_data_reader, *args, **kwargs)

    quantize_static.qdqkit_original = original  # type: ignore[attr-defined]
    return quantize_static


def _int8_checked(original: Any, calls: list) -> Any:
    """ModelOpt's INT8 quantization with what patch 8 needs of it: the placement's list of inputs whose Q/DQ go
    again after quantization, and a check that none of the tensors given a unit range kept a Q/DQ. Each call's
    ``_Int8Call`` goes to ``calls``."""

    def quantize_int8(*args: Any, **kwargs: Any) -> Any:
        call = _Int8Call.current = _Int8Call()
        calls.append(call)
        try:
            model = original(*args, **kwargs)
        finally:
            _Int8Call.current = None
        names = {i.name for i in model.graph.initializer}
        cast_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}

        def source(tensor: str) -> str:  # through the Casts that a float16 model puts before a Q/DQ
            while tensor in cast_of:
                tensor = cast_of[tensor]
            return tensor

        kept = {source(n.input[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"} & call.unit_ranges
        kept |= {t for t in call.unit_ranges if f"{t}_scale" in names}
        if kept:
            raise RuntimeError(f"qdqkit's patch 8 gave {sorted(kept)[:3]} a unit range for Q/DQ that ModelOpt was to "
                               "remove, but it kept them; quantize with modelopt_compat.patched_modelopt("
                               "read_ranges_only=False) and please report this")
        return model

    quantize_int8.qdqkit_original = original  # type: ignore[attr-defined]
    return quantize_int8


def _placement_noted(original: Any) -> Any:
    """ModelOpt's default Q/DQ placement (``_find_nodes_to_quantize``), its list of inputs whose Q/DQ go again after
    quantization kept for the current INT8 call (patch 8)."""

    def find_nodes_to_quantize(*args: Any, **kwargs: Any) -> Any:
        nodes, no_quantize_inputs = original(*args, **kwargs)
        if _Int8Call.current is not None:
            _Int8Call.current.no_quantize_inputs = list(no_quantize_inputs)
        return nodes, no_quantize_inputs

    return find_nodes_to_quantize


_INT8 = ("modelopt.onnx.quantization.quantize", "quantize_int8")
_PLACEMENT = ("modelopt.onnx.quantization.int8", "_find_nodes_to_quantize")


@contextlib.contextmanager
def calibration_of_read_ranges_only() -> Iterator[list]:
    """Inside the block ModelOpt calibrates only the tensors whose ranges its quantizer reads and its
    post-processing keeps (patch 8). Yields a list that receives an ``_Int8Call`` per INT8 quantization."""
    calls: list[_Int8Call] = []
    static_mod = importlib.import_module(_QUANTIZE_STATIC[0])
    original = getattr(static_mod, _QUANTIZE_STATIC[1])
    if hasattr(original, "qdqkit_original"):
        yield calls
        return
    int8_mod, placement_mod = importlib.import_module(_INT8[0]), importlib.import_module(_PLACEMENT[0])
    with _replaced((static_mod, _QUANTIZE_STATIC[1], _calibrating_only(original)),
                   (int8_mod, _INT8[1], _int8_checked(getattr(int8_mod, _INT8[1]), calls)),
                   (placement_mod, _PLACEMENT[1], _placement_noted(getattr(placement_mod, _PLACEMENT[1])))):
        yield calls


# -- patch 10: ModelOpt's loggers without handlers of their own ----------------------------------------------------

_OWN_LOGGERS = ("modelopt.onnx", "modelopt.onnx.autocast")
# the modules that imported configure_logging and call it on every call of their quantize (not logging_config
# itself: a module imported inside the block would bind the wrapper for good)
_LOGGING_CONFIGURERS = ("modelopt.onnx.quantization.quantize", "modelopt.onnx.quantization.int8",
                        "modelopt.onnx.quantization.fp8", "modelopt.onnx.quantization.int4")


def _handlers_kept_off(original: Any) -> Any:
    """ModelOpt's ``configure_logging`` (levels, handlers), then the handlers it installed taken off (patch 10)."""

    def configure_logging(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        for log in map(logging.getLogger, _OWN_LOGGERS):
            for handler in list(log.handlers):
                log.removeHandler(handler)
                handler.close()  # made for this call and dropped; closing leaves sys.stdout open

    configure_logging.qdqkit_original = original  # type: ignore[attr-defined]
    return configure_logging


@contextlib.contextmanager
def own_log_handlers_off() -> Iterator[None]:
    """ModelOpt's loggers without handlers for the block, also after ``configure_logging`` runs in it; the
    handlers found on entry put back on exit (patch 10). Their records go on to the root logger's handlers."""
    found = [(log, list(log.handlers)) for log in map(logging.getLogger, _OWN_LOGGERS)]
    swaps = []
    for mod_name in _LOGGING_CONFIGURERS:
        mod = importlib.import_module(mod_name)
        current = getattr(mod, "configure_logging", None)
        if current is not None and not hasattr(current, "qdqkit_original"):
            swaps.append((mod, "configure_logging", _handlers_kept_off(current)))
    for log, handlers in found:
        for handler in handlers:
            log.removeHandler(handler)
    try:
        with _replaced(*swaps):
            yield
    finally:
        for log, handlers in found:
            for handler in handlers:
                log.addHandler(handler)


# -- patch 11: calibration at the full level, its observed tensors read in the blocked layout ----------------------

_SESSION_MAKER = ("modelopt.onnx.quantization.ort_patching", "_create_inference_session_with_ep_config")
_NCHWC_DOMAIN = "com.microsoft.nchwc"
_NEVER_PADDED = 16  # MLAS's NCHWc layout blocks channels by 8 or 16: a multiple of 16 needs no padding
# True while ModelOpt opens patch 11's already optimized model, which patch 4 then leaves at ORT_DISABLE_ALL. A flag
# for the call, not the model's path: the custom-op registry may open the session on a copy of the model (custom
# ops with Python kernels), under another path or as bytes.
_PREOPTIMIZED: contextvars.ContextVar[bool] = contextvars.ContextVar("qdqkit_preoptimized", default=False)


def _full_min_or_max(node: Any) -> bool:
    """A ReduceMin or ReduceMax over every axis: its result does not depend on the order of the values."""
    attrs = {a.name: a.i for a in node.attribute}
    return node.domain in ("", "ai.onnx") and node.op_type in ("ReduceMin", "ReduceMax") and len(node.input) == 1 \
        and "axes" not in attrs and not attrs.get("noop_with_empty_axes", 0)


def blocked_reads(model: Any, outputs: bool) -> dict[str, int]:
    """Take out of ``model`` (saved by onnxruntime at ``ORT_ENABLE_ALL``) every ``ReorderOutput`` that converts a
    tensor from the NCHWc layout back to NCHW only for what does not depend on the order of the values: a graph
    output nothing else reads (only with ``outputs``: the caller guarantees that those outputs go to histograms),
    or ReduceMin/ReduceMax over every axis (which are all that reads it). Only where it is not channels-last and
    its channel count is a multiple of 16, so the blocked tensor holds the same values in another order and no
    padding. A blocked output takes the output's name; the reductions read the blocked tensor. Returns the tensors
    no longer reordered, with their channel counts (patch 11)."""
    from qdqkit.customops import iter_graphs

    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    in_bodies = {name for g in list(iter_graphs(graph))[1:] for node in g.node for name in node.input}
    renamed: dict[str, str] = {}  # blocked tensor -> output name
    reduced: dict[str, str] = {}  # reordered tensor -> blocked tensor
    channels: dict[str, int] = {}
    kept = []
    for node in graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        count = attrs.get("channels", 0)
        if node.domain == _NCHWC_DOMAIN and node.op_type == "ReorderOutput" and not attrs.get("channels_last", 0) \
                and count > 0 and count % _NEVER_PADDED == 0 and node.output[0] not in in_bodies:
            blocked, plain = node.input[0], node.output[0]
            read = readers.get(plain, [])
            if outputs and plain in graph_outputs and not read and blocked not in renamed \
                    and blocked not in graph_outputs:
                renamed[blocked] = plain
                channels[plain] = count
                continue
            if plain not in graph_outputs and read and all(map(_full_min_or_max, read)):
                reduced[plain] = blocked
                channels[plain] = count
                continue
        kept.append(node)
    if channels:
        del graph.node[:]
        graph.node.extend(kept)
        for node in graph.node:
            # reductions first: a blocked tensor they now read may itself take an output's name
            for names, table in ((node.input, reduced), (node.input, renamed), (node.output, renamed)):
                for i, name in enumerate(names):
                    if name in table:
                        names[i] = table[name]
        for info in graph.value_info:
            if info.name in renamed:
                info.name = renamed[info.name]
    return channels


def _blocked_model(calibrator: Any, kwargs: dict, outputs: bool) -> tuple[str, dict[str, int], int] | str:
    """The model of a calibration's session optimized at ``ORT_ENABLE_ALL`` and saved with ``blocked_reads``
    applied, the observed tensors read blocked (the fetched ones with ``outputs``, else the reduced ones) with their
    channel counts, and how many it observes; or why patch 11 does not apply."""
    if outputs and not hasattr(type(calibrator).collect_data, "qdqkit_original"):
        # a histogram calibration's outputs must reach nothing but the histograms: patch 7's loop hands them to the
        # collector and nowhere else (per-node calibration, say, feeds them on)
        return "the calibration loop is not patch 7's"
    providers = [p[0] if isinstance(p, tuple) else p for p in kwargs.get("execution_providers") or []]
    if not providers or set(providers) != {"CPUExecutionProvider"} or kwargs.get("trt_extra_plugin_lib_paths"):
        return "the session does not run on onnxruntime's CPU provider alone"
    import onnx
    import onnxruntime as ort

    source = str(calibrator.augmented_model_path)
    optimized = source + ".qdqkit-all.onnx"  # beside it, in onnxruntime's temporary folder for the call
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = optimized
    # the weights in a file beside it, untouched by the edit below: only the graph is read and written again
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     os.path.basename(optimized) + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3  # not its warning that the file suits this machine only: it is used once, here
    try:
        ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        model = onnx.load(optimized, load_external_data=False)
    except Exception as e:  # the extended level's session may still work: ModelOpt's own call will tell
        return f"onnxruntime could not optimize it at the full level and save it ({type(e).__name__}: {e})"
    channels = blocked_reads(model, outputs)
    if not channels:
        return "onnxruntime put no observed tensor in its blocked layout"
    onnx.save(model, optimized)
    if outputs:  # the fetched ones (a reduction the model itself makes may read a blocked tensor too)
        names = {o.name for o in model.graph.output}
        return optimized, {n: c for n, c in channels.items() if n in names}, len(names)
    return optimized, channels, len({n.input[0] for n in model.graph.node if _full_min_or_max(n)})


def _blocked_session_maker(original: Any, notes: list) -> Any:
    """ModelOpt's ``create_inference_session``; for a histogram or "max" calibration on the CPU, on the model
    ``_blocked_model`` makes (patch 11). What happened, per session, goes to ``notes``: (what the session does
    with the observed tensors, how many are read blocked, how many it observes), or why the patch did not apply."""

    def create_inference_session(calibrator: Any, **kwargs: Any) -> None:
        from onnxruntime.quantization.calibrate import HistogramCalibrater, MinMaxCalibrater

        histograms = isinstance(calibrator, HistogramCalibrater)
        if kwargs.get("model_path") is not None or not (histograms or isinstance(calibrator, MinMaxCalibrater)):
            return original(calibrator, **kwargs)
        made = _blocked_model(calibrator, kwargs, outputs=histograms)
        if isinstance(made, str):
            notes.append(made)
            return original(calibrator, **kwargs)
        path, channels, observed = made
        token = _PREOPTIMIZED.set(True)  # the one session this call opens, on whatever copy of ``path``
        try:
            original(calibrator, **{**kwargs, "model_path": path})
        finally:
            _PREOPTIMIZED.reset(token)
        if histograms:
            calibrator.qdqkit_blocked = channels
        notes.append(("fetched" if histograms else "reduced", len(channels), observed))

    create_inference_session.qdqkit_original = original  # type: ignore[attr-defined]
    return create_inference_session


def unpadded(name: str, value: Any, channels: int) -> None:
    """Check that an output fetched in the blocked layout has ``channels`` channels, not more (padding, which would
    add values to its histogram): raise otherwise (patch 11)."""
    if getattr(value, "ndim", 0) < 2 or value.shape[1] != channels:
        raise RuntimeError(f"qdqkit's patch 11 fetched {name} in onnxruntime's blocked layout expecting {channels} "
                           f"channels, and got shape {getattr(value, 'shape', None)}; quantize with "
                           "modelopt_compat.patched_modelopt(blocked_fetch=False) and please report this")


@contextlib.contextmanager
def calibration_outputs_blocked() -> Iterator[list]:
    """Inside the block, the session of a histogram or "max" calibration on the CPU runs at ``ORT_ENABLE_ALL`` with
    the observed tensors read in onnxruntime's blocked layout where no padding can arise (patch 11). Yields a list
    that receives, per calibration session, ("fetched" or "reduced", tensors read blocked, tensors observed) or why
    the patch did not apply."""
    mod = importlib.import_module(_SESSION_MAKER[0])
    current = getattr(mod, _SESSION_MAKER[1])
    notes: list = []
    if hasattr(current, "qdqkit_original"):
        yield notes
        return
    with _replaced((mod, _SESSION_MAKER[1], _blocked_session_maker(current, notes))):
        yield notes


@contextlib.contextmanager
def patched_modelopt(fold_constants: bool = True, running_ranges: bool = True,
                     direct_histograms: bool = True, read_ranges_only: bool = True,
                     shape_probes: bool = True, log_handlers_off: bool = True,
                     blocked_fetch: bool = True) -> Iterator[PatchNotes]:
    """Apply the patches listed in the module docstring for the duration of the block (re-entrant).
    ``direct_histograms`` switches patches 6 and 7 together (patch 11 needs 7 for histograms);
    ``read_ranges_only`` is patch 8, ``shape_probes`` patch 9, ``log_handlers_off`` patch 10, ``blocked_fetch``
    patch 11. Yields the ``PatchNotes`` of the block."""
    check_version()
    with _LOCK, onnxruntime_quantization_restored():
        from modelopt.onnx import trt_utils

        merged = _merging_interpreter(trt_utils.interpret_trt_plugins_precision_flag)
        swaps = []  # patches 1 and 2, where an enclosing block has not applied them already
        for mod_name in _PRECISION_FLAG_USERS:
            mod = importlib.import_module(mod_name)
            current = getattr(mod, "interpret_trt_plugins_precision_flag", None)
            if current is not None and not hasattr(current, "qdqkit_original"):
                swaps.append((mod, "interpret_trt_plugins_precision_flag", merged))
        if not tensorrt_available():
            from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer

            if GraphSanitizer.find_custom_nodes is not _find_custom_nodes_without_trt:
                swaps.append((GraphSanitizer, "find_custom_nodes", _find_custom_nodes_without_trt))
        with _replaced(*swaps), \
                calibration_sessions_folded() if fold_constants else contextlib.nullcontext(), \
                calibration_ranges_running() if running_ranges else contextlib.nullcontext(), \
                calibration_histograms_direct() if direct_histograms else contextlib.nullcontext(), \
                calibration_of_read_ranges_only() if read_ranges_only else contextlib.nullcontext([]) as calls, \
                shape_probes_inferred() if shape_probes else contextlib.nullcontext([]) as probes, \
                own_log_handlers_off() if log_handlers_off else contextlib.nullcontext(), \
                calibration_outputs_blocked() if blocked_fetch else contextlib.nullcontext([]) as blocked:
            yield PatchNotes(calls, probes, blocked)


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
