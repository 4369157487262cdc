"""Session 7 feasibility 4: cores busy per 100 ms during a solo run of the calibration session (spinning off), and
when a sample step's histograms and run end, sequential and overlapped (`python feas4.py`)."""
import os
import sys
import threading
import time

from _common import cal, collecting, ex, pool2, sessions, source, special_pool

from qdqkit import modelopt_compat as mc

idle_pool = special_pool(lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)))


def cpu_now():
    t = os.times()
    return t.user + t.system


stop = threading.Event()


def sampler(trace):
    while not stop.is_set():
        trace.append((time.perf_counter(), cpu_now()))
        time.sleep(0.01)


with collecting():
    s = sessions[False]
    cal.infer_session = s
    outs = s.run(None, source.sample(1))
    # utilisation timeline of a solo run, spinning off (100 ms buckets)
    for rep in range(2):
        trace = []
        stop.clear()
        th = threading.Thread(target=sampler, args=(trace,))
        th.start()
        t0 = time.perf_counter()
        o2 = s.run(None, source.sample(1))
        t1 = time.perf_counter()
        stop.set()
        th.join()
        del o2
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
                def timed_run(feed=feed):
                    r = s.run(None, feed)
                    return r, time.perf_counter()
                fut = ex.submit(timed_run)
                mc._collect_one_sample(cal, outs)
                th = time.perf_counter()
                outs, tr = fut.result()
            else:
                mc._collect_one_sample(cal, outs)
                th = time.perf_counter()
                outs = s.run(None, feed)
                tr = time.perf_counter()
            print(name, "histograms done at", round(th - t0, 3), "run done at", round(tr - t0, 3), file=sys.stderr)
