"""Session 7 feasibility 3: feas2's interleaved sample steps with the histogram threads at SCHED_IDLE and at nice 19,
after each calibration session timed alone (`python feas3.py [rounds]`; RESULTS.md's two runs: `feas3.py 8`)."""
import os
import sys
import threading
import time

from _common import collecting, one, pool2, sessions, source, special_pool, step_rounds

idle_pool = special_pool(lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)))
nice_pool = special_pool(lambda: os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19))
POOLS = {2: pool2, 1: one, "idle": idle_pool, "nice": nice_pool}
CONFIGS = [("seq-spin", False, True, 2), ("ov-spin", True, True, 2), ("ov-nospin", True, False, 2),
           ("ov-nospin-idle", True, False, "idle"), ("ov-nospin-nice", True, False, "nice"),
           ("seq-nospin", False, False, 2)]
with collecting():
    for spin, sess in sessions.items():
        w, c = [], []
        for i in range(4):
            t, p = time.perf_counter(), time.process_time()
            o = sess.run(None, source.sample(i % 3))
            del o
            w.append(time.perf_counter() - t)
            c.append(time.process_time() - p)
        print("calibration session alone, spin", spin, "wall", [round(x, 3) for x in w], "cpu",
              [round(x, 3) for x in c], file=sys.stderr, flush=True)
    step_rounds(CONFIGS, POOLS, int(sys.argv[1]) if len(sys.argv) > 1 else 6)
