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

def cpu_now():
    t = os.times(); return t.user + t.system
stop = threading.Event()
def sampler(trace):
    while not stop.is_set():
        trace.append((time.perf_counter(), cpu_now())); time.sleep(0.01)
with mc.patched_modelopt(), contextlib.redirect_stdout(io.StringIO()):
    from onnxruntime.quantization.calibrate import HistogramCollector
    import modelopt.onnx.quantization.ort_patching as op
    HistogramCollector.collect_value = op._collect_value
    s = sessions[False]
    cal.infer_session = s
    for i in range(2):
        outs = s.run(None, source.sample(i))
    # utilisation timeline of a solo run, spinning off (100 ms buckets)
    for rep in range(2):
        trace = []; stop.clear()
        th = threading.Thread(target=sampler, args=(trace,)); th.start()
        t0 = time.perf_counter(); o2 = s.run(None, source.sample(1)); t1 = time.perf_counter()
        stop.set(); th.join(); del o2
        buckets = []
        for k in range(int((t1 - t0) / 0.1) + 1):
            pts = [p for p in trace if t0 + 0.1 * k <= p[0] <= t0 + 0.1 * (k + 1)]
            if len(pts) > 1:
                buckets.append(round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 2))
        print("solo run", round(t1 - t0, 3), "cores busy per 100 ms:", buckets, file=sys.stderr)
    for name, pool in (("ov-nospin", pool2), ("ov-nospin-idle", idle_pool), ("seq-nospin", pool2)):
        mc._histogram_threads = lambda p=pool: p
        for rep in range(3):
            feed = source.sample(2)
            t0 = time.perf_counter()
            if name.startswith("ov"):
                def timed_run():
                    r = s.run(None, feed); return r, time.perf_counter()
                fut = ex.submit(timed_run)
                mc._collect_one_sample(cal, outs); th = time.perf_counter()
                outs, tr = fut.result()
            else:
                mc._collect_one_sample(cal, outs); th = time.perf_counter()
                outs = s.run(None, feed); tr = time.perf_counter()
            print(name, "histograms done at", round(th - t0, 3), "run done at", round(tr - t0, 3), file=sys.stderr)
    mc._histogram_threads = lambda: pool2
