#!/usr/bin/env bash
# Session 8 experiment (issue 6): group order of the SCA cooperative kernel. One device call, from the repository
# root: timings of every variant (sca_order.py), then Nsight Compute on a few of them against the shipped kernel.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
REPO_ROOT=$PWD
source "$REPO_ROOT/benchmarks/device_shim.sh"
S=$REPO/benchmarks/experiments/s8-order/sca_order.py
timeout 300 python3 "$S" 2>&1 | tee "$OUT/sca_order.log"
M=gpu__time_duration.sum,l1tex__t_sector_hit_rate.pct,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sectors_srcunit_tex_op_read.sum,smsp__inst_executed.sum
for v in ${NCU_VARIANTS:-hp1_b256 hp2_b256 hp2_b512 hp2_b256_swz}; do
  S8_ONLY=$v timeout 100 ncu --clock-control none --metrics $M -k regex:msda_ --csv python3 "$S" \
    > "$OUT/ncu_$v.csv" 2> "$OUT/ncu_$v.err"
  python3 - "$OUT/ncu_$v.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, body = rows[0], rows[1:]
k, mn, mv = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
seen = {}
for r in body:
    seen.setdefault(r[k], {})[r[mn]] = r[mv]
for name, m in seen.items():
    print(name, "; ".join(f"{a.split('.')[0].split('__')[-1]}={b}" for a, b in sorted(m.items())))
PY
done 2>&1 | tee "$OUT/ncu.log"
