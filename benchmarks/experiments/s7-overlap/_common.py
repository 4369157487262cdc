"""What feas2.py, feas3.py and feas4.py share (session 7, issue 3; kept so that RESULTS.md's overlap figures can be
re-run): BEVFormer-tiny as the demo's qdq pass gets it, one 2-frame entropy calibration whose ModelOpt calibrator is
captured (its augmented model copied to $S7_SCRATCH, default /tmp/s7, for solo.py), the plain session, calibration
sessions on the captured model with and without onnxruntime's spinning, the thread pools the configurations use,
and the sample step timed in feas2/feas3. Importing it runs the capture (about a minute)."""
import contextlib
import io
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import onnxruntime as ort
import qdq_calibration as qc

from qdqkit import modelopt_compat as mc

SCRATCH = os.environ.get("S7_SCRATCH", "/tmp/s7")
load0 = os.getloadavg()
model, registry, source, exclude = qc._bevformer(3)
_captured = {}
_collect = mc._collect_one_sample


def _capture(calibrator, outputs):
    if "cal" not in _captured:
        _captured["cal"] = calibrator
        shutil.copy(calibrator.augmented_model_path, os.path.join(SCRATCH, "aug.onnx"))
    _collect(calibrator, outputs)


mc._collect_one_sample = _capture
qc._calibrate(model, source, registry, 2, method="entropy", exclude=exclude)
mc._collect_one_sample = _collect
cal = _captured["cal"]
plain = registry.session(model)


def calsession(spin=True):
    """A session on the captured augmented model with patch 4's options (spinning off when asked)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with registry.installed_in_onnxruntime():
        return ort.InferenceSession(os.path.join(SCRATCH, "aug.onnx"), sess_options=so,
                                    providers=[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})])


sessions = {True: calsession(True), False: calsession(False)}
ex = ThreadPoolExecutor(1)  # runs the next sample while the histograms are built
one = ThreadPoolExecutor(1)
pool2 = mc._histogram_threads()


def special_pool(fn):
    """Two histogram threads, each set up by fn (a scheduling class or a nice value) before first use."""
    p = ThreadPoolExecutor(2, thread_name_prefix="special")
    b = threading.Barrier(2)

    def setup():
        fn()
        b.wait()

    [f.result() for f in [p.submit(setup), p.submit(setup)]]
    return p


@contextlib.contextmanager
def collecting():
    """ModelOpt's patches on, onnxruntime's per-sample prints muted, ModelOpt's histogram collector installed, and
    both calibration sessions warmed up on two samples."""
    with mc.patched_modelopt(), contextlib.redirect_stdout(io.StringIO()):
        import modelopt.onnx.quantization.ort_patching as op
        from onnxruntime.quantization.calibrate import HistogramCollector
        HistogramCollector.collect_value = op._collect_value
        for s in sessions.values():
            for i in range(2):
                s.run(None, source.sample(i))
        try:
            yield
        finally:
            mc._histogram_threads = lambda: pool2


def step_rounds(configs, pools, rounds):
    """``rounds`` rounds, each timing every configuration (name, overlapped, spinning, pool key) over three sample
    steps (histograms of the previous sample, run of the next: in turn, or the run in ``ex`` meanwhile), then three
    plain frames; prints each round and the medians over plain. Call inside ``collecting()``."""
    res = {c[0]: [] for c in configs}
    plains = []
    for r in range(rounds):
        for name, overlap, spin, threads in configs:
            cal.infer_session = sessions[spin]
            mc._histogram_threads = lambda p=pools[threads]: p
            outs = cal.infer_session.run(None, source.sample(0))
            t = time.perf_counter()
            for k in range(3):
                feed = source.sample((k + 1) % 3)
                if overlap:
                    fut = ex.submit(cal.infer_session.run, None, feed)
                    mc._collect_one_sample(cal, outs)
                    outs = fut.result()
                else:
                    mc._collect_one_sample(cal, outs)
                    outs = cal.infer_session.run(None, feed)
            res[name].append((time.perf_counter() - t) / 3)
            del outs
        t = time.perf_counter()
        for k in range(3):
            plain.run(None, source.sample(k))
        plains.append((time.perf_counter() - t) / 3)
        print(r, {k: round(v[-1], 3) for k, v in res.items()}, "plain", round(plains[-1], 3), file=sys.stderr, flush=True)
    p = statistics.median(plains)
    print("plain", round(p, 3), "load before", load0, "after", os.getloadavg(), file=sys.stderr)
    for k, v in res.items():
        print(k, "median step", round(statistics.median(v), 3), "s =", round(statistics.median(v) / p, 3), "x plain",
              [round(x / p, 3) for x in v], file=sys.stderr)
