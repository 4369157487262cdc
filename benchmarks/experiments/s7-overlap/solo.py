"""Session 7: wall and process CPU time of one run, plain model and calibration session (aug.onnx), per option."""
import os, sys, time, statistics
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import qdq_calibration as qc
import onnxruntime as ort
load0 = os.getloadavg()
model, registry, source, exclude = qc._bevformer(3)

def so_(level=None, spin=True, threads=0, cal=False):
    so = ort.SessionOptions()
    if level is not None:
        so.graph_optimization_level = level
    if cal:
        so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so
EXT = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
cfgs = {
    "plain default": lambda: registry.session(model),
    "plain spin off": lambda: registry.session(model, sess_options=so_(spin=False)),
    "plain intra_op_num_threads=1": lambda: registry.session(model, sess_options=so_(threads=1)),
}
def cal(**kw):
    def make():
        with registry.installed_in_onnxruntime():
            return ort.InferenceSession(os.path.join(os.environ.get("S7_SCRATCH", "/tmp/s7"), "aug.onnx"), sess_options=so_(EXT, cal=True, **kw),
                providers=[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})])
    return make
cfgs["calibration session (88 outputs) spin on"] = cal()
cfgs["calibration session spin off"] = cal(spin=False)
cfgs["calibration session intra_op_num_threads=1"] = cal(threads=1)
sess = {k: f() for k, f in cfgs.items()}
for s in sess.values():
    for i in range(2):
        o = s.run(None, source.sample(i)); del o
res = {k: ([], []) for k in sess}
for r in range(5):
    for k, s in sess.items():
        t, p = time.perf_counter(), time.process_time()
        o = s.run(None, source.sample(r % 3)); del o
        res[k][0].append(time.perf_counter() - t); res[k][1].append(time.process_time() - p)
for k, (w, c) in res.items():
    mw, mc_ = statistics.median(w), statistics.median(c)
    print(f"{k}: wall {mw:.3f} s, process CPU {mc_:.3f} s, cores busy {mc_ / mw:.2f}, idle core-s {2 * mw - mc_:.3f}")
print("load before", [round(x, 2) for x in load0], "after", [round(x, 2) for x in os.getloadavg()])
