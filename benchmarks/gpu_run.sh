#!/usr/bin/env bash
# One device call: environment check, kernel resource report, GPU tests, op benchmarks, full-frame benchmark.
# Run from the repository root on a machine with a CUDA GPU; logs go to $OUT (default ./gpu_out).
# Usage: bash benchmarks/gpu_run.sh [stage ...]   stages: env build test ops launch frame sanitize ncu (default: env build test ops frame)
# OPS_ARGS passes arguments to gpu_ops.py (e.g. "--skip sweep rotate dcn"); NCU_CASES names the MSDA cases that
# gpu_profile.py runs under Nsight Compute (default all: tsa sca decoder).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${*:-env build test ops frame}

source "$(dirname "$0")/device_shim.sh"

has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

if has env; then
  { nvidia-smi -L; nvcc --version | tail -1
    python3 -c "import torch, cupy, numpy; print('torch', torch.__version__, 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
    python3 -c "import cuda.bindings; print('cuda.bindings', cuda.bindings.__version__)" 2>&1 | tail -1
    python3 -c "import qdqkit.custom_ops.cuda as c; print('available', c.available(), c.unavailable_reason())"
  } 2>&1 | tee "$OUT/env.log"
fi

if has build; then
  # Resource usage and SASS load widths of the kernels as the GPU's own compiler builds them (sm_90).
  { for s in msda rotate dcn; do
      python3 -c "from qdqkit.custom_ops.cuda import _build; open('/tmp/$s.cu','w').write(_build.source('$s'))"
      nvcc -arch=sm_90 -cubin -Xptxas -v -o /tmp/$s.cubin /tmp/$s.cu 2>&1 | grep -E "Compiling|registers|spill" | paste - - - 2>/dev/null
    done
    for k in msda_fp16_v8 msda_fp32_v4 msda_int8_v8; do
      echo "$k: $(cuobjdump -sass -fun $k /tmp/msda.cubin | grep -oE '(LDG|STG)\.E[.A-Z0-9]*' | sort | uniq -c | tr '\n' ' ')"
    done
    # instruction mix of the kernels BEVFormer runs (static counts: the unrolled bodies)
    for k in msda_co_lp8_fp16 msda_co_lp4_fp16 msda_co_lp8_fp32 msda_co_lp8_int8 msda_lp8_fp16_v16 msda_lp8_int8_v8 \
             msda_pk_lp8_fp16 msda_pk_lp8_int8 msda_pack_fp16 msda_pack_int8; do
      cuobjdump -sass -fun $k /tmp/msda.cubin > /tmp/$k.sass
      echo "$k: $(grep -cE '^ +/\*[0-9a-f]{4}\*/' /tmp/$k.sass) instructions;" \
        "$(grep -oE '^ +/\*[0-9a-f]{4}\*/ +(@!?U?P[0-9T] +)?[A-Z0-9]+' /tmp/$k.sass | awk '{print $NF}' | sort | uniq -c | sort -rn | head -14 | awk '{printf "%s %s, ", $2, $1}')"
    done
  } 2>&1 | tee "$OUT/build.log" | tail -20
fi

if has test; then
  T=$REPO/tests/custom_ops
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -q -rs -p no:cacheprovider \
    $T/test_cuda_cpu.py $T/test_cuda_msda.py $T/test_cuda_rotate.py $T/test_cuda_dcn.py $T/test_cuda_trt_abi.py \
    $T/test_cuda_frame.py $T/test_ops_torch.py::test_cuda_tensors_go_to_the_cuda_kernels \
    --durations=5 2>&1 | tee "$OUT/pytest.log" | tail -40
fi

if has ops; then
  timeout ${OPS_TIMEOUT:-300} python3 "$REPO/benchmarks/gpu_ops.py" --json "$OUT/ops.json" ${OPS_ARGS:-} 2>&1 | tee "$OUT/ops.log" | tail -45
fi

if has sanitize; then
  timeout 240 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -c "$REPO/pyproject.toml" \
    --rootdir "$REPO" -q -x -p no:cacheprovider "$REPO/tests/custom_ops/test_cuda_msda.py" \
    -k "packed or one-row or one-pixel or odd or border or tail or misaligned" 2>&1 | tee "$OUT/sanitize.log" | tail -8
fi

if has ncu; then
  M=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__throughput.avg.pct_of_peak_sustained_active,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
  timeout 150 ncu --clock-control none --metrics $M -k regex:msda --csv python3 "$REPO/benchmarks/gpu_profile.py" ${NCU_CASES:-} \
    > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  # where the instructions and the loads go: counts per kernel, L1 sectors per request and hit rate, stall reasons
  M2=smsp__inst_executed.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sector_hit_rate.pct,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio
  timeout 150 ncu --clock-control none --metrics $M2 -k regex:msda --csv python3 "$REPO/benchmarks/gpu_profile.py" ${NCU_CASES:-} \
    > "$OUT/ncu2.csv" 2> "$OUT/ncu2.err" && cat "$OUT/ncu2.csv" >> "$OUT/ncu.csv"
  python3 - "$OUT/ncu.csv" <<'PY' | tee "$OUT/ncu.log"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]
body = [r for r in rows[1:] if r != head]
k, n, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
ids = head.index("ID")
table = {}
for r in body:
    metric = r[n].split("__", 1)[1].split(".")[0].replace("average_warps_issue_stalled_", "stall_")
    table.setdefault((r[ids], r[k]), {})[metric] = r[v]
for (i, name), m in table.items():
    print(f"{name[:26]:26}", " ".join(f"{a}={b}" for a, b in m.items()))
PY
fi

if has launch; then
  timeout 120 python3 "$REPO/benchmarks/gpu_launch.py" 2>&1 | tee "$OUT/launch.log"
fi

if has frame; then
  timeout 300 python3 "$REPO/benchmarks/gpu_frame.py" --json "$OUT/frame.json" 2>&1 | tee "$OUT/frame.log" | tail -12
fi
cd "$REPO" && rm -rf "$SHIM"
