"""Session 7 feasibility 2: interleaved sequential vs overlapped sample steps on BEVFormer-tiny's calibration session."""
import os, sys, time, statistics, shutil, contextlib, io
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import qdq_calibration as qc
import onnxruntime as ort
from concurrent.futures import ThreadPoolExecutor

load0 = os.getloadavg()
model, registry, source, exclude = qc._bevformer(3)
from qdqkit import modelopt_compat as mc
cap = {}
orig = mc._collect_one_sample
def hook(calibrator, outputs):
    if "cal" not in cap:
        cap["cal"] = calibrator
        shutil.copy(calibrator.augmented_model_path, os.path.join(os.environ.get("S7_SCRATCH", "/tmp/s7"), "aug.onnx"))
    orig(calibrator, outputs)
mc._collect_one_sample = hook
qc._calibrate(model, source, registry, 2, method="entropy", exclude=exclude)
mc._collect_one_sample = orig
cal = cap["cal"]
plain = registry.session(model)

def calsession(spin=True):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with registry.installed_in_onnxruntime():
        return ort.InferenceSession(os.path.join(os.environ.get("S7_SCRATCH", "/tmp/s7"), "aug.onnx"), sess_options=so,
                                    providers=[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})])

sessions = {True: calsession(True), False: calsession(False)}
ex = ThreadPoolExecutor(1)
one = ThreadPoolExecutor(1)
pool2 = mc._histogram_threads()
import threading
def special_pool(fn):
    p = ThreadPoolExecutor(2, thread_name_prefix="special")
    b = threading.Barrier(2)
    def setup():
        fn(); b.wait()
    list(f.result() for f in [p.submit(setup), p.submit(setup)])
    return p
idle_pool = special_pool(lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)))
nice_pool = special_pool(lambda: os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19))
POOLS = {2: pool2, 1: one, "idle": idle_pool, "nice": nice_pool}
CONFIGS = [("seq-spin", False, True, 2), ("ov-spin", True, True, 2), ("ov-nospin", True, False, 2),
           ("ov-nospin-idle", True, False, "idle"), ("ov-nospin-nice", True, False, "nice"),
           ("seq-nospin", False, False, 2)]
res = {c[0]: [] for c in CONFIGS}
plains = []
with mc.patched_modelopt(), contextlib.redirect_stdout(io.StringIO()):
    from onnxruntime.quantization.calibrate import HistogramCollector
    import modelopt.onnx.quantization.ort_patching as op
    HistogramCollector.collect_value = op._collect_value
    for s in sessions.values():
        for i in range(2):
            outs = s.run(None, source.sample(i))
    for spin, sess in sessions.items():
        w, c = [], []
        for i in range(4):
            t, p = time.perf_counter(), time.process_time()
            o = sess.run(None, source.sample(i % 3)); del o
            w.append(time.perf_counter() - t); c.append(time.process_time() - p)
        print("calibration session alone, spin", spin, "wall", [round(x, 3) for x in w], "cpu", [round(x, 3) for x in c],
              file=sys.stderr, flush=True)
    for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
        for name, overlap, spin, threads in CONFIGS:
            cal.infer_session = sessions[spin]
            mc._histogram_threads = lambda p=POOLS[threads]: p
            outs = cal.infer_session.run(None, source.sample(0))
            t = time.perf_counter()
            for k in range(3):  # three sample steps: histograms of the previous sample, run of the next
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
    mc._histogram_threads = lambda: pool2
p = statistics.median(plains)
print("plain", round(p, 3), "load before", load0, "after", os.getloadavg(), file=sys.stderr)
for k, v in res.items():
    print(k, "median step", round(statistics.median(v), 3), "s =", round(statistics.median(v) / p, 3), "x plain",
          [round(x / p, 3) for x in v], file=sys.stderr)
