"""Session 7 feasibility 2: interleaved sequential vs overlapped sample steps on BEVFormer-tiny's calibration session
(the first 6-round run; `python feas2.py [rounds]`)."""
import sys

from _common import collecting, one, pool2, step_rounds

CONFIGS = [("seq-spin", False, True, 2), ("ov-spin", True, True, 2), ("seq-nospin", False, False, 2),
           ("ov-nospin", True, False, 2), ("ov-nospin-pool1", True, False, 1), ("ov-spin-pool1", True, True, 1)]
with collecting():
    step_rounds(CONFIGS, {2: pool2, 1: one}, int(sys.argv[1]) if len(sys.argv) > 1 else 6)
