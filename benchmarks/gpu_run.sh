#!/usr/bin/env bash
# One device call: environment check, kernel resource report, GPU tests, op benchmarks, full-frame benchmark.
# Run from the repository root on a machine with a CUDA GPU; logs go to $OUT (default ./gpu_out).
# Usage: bash benchmarks/gpu_run.sh [stage ...]   stages: env build test ops frame sanitize (default: all but sanitize)
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${*:-env build test ops frame}

# The device has no qdqkit installed: lay the source tree out as the installed package would be (setup.py's
# package_dir) with symbolic links, so nothing is built or written into the checkout.
SHIM=$(mktemp -d)
mkdir -p "$SHIM/qdqkit"
for f in qdqkit/*; do ln -s "$PWD/$f" "$SHIM/qdqkit/"; done
ln -s "$PWD/passes" "$SHIM/qdqkit/passes"
ln -s "$PWD/custom_ops" "$SHIM/qdqkit/custom_ops"
ln -s "$PWD/examples" "$SHIM/qdqkit/examples"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
# Work from the shim: run from the checkout, Python would find its bare qdqkit/ (without the sub-packages) first.
REPO=$PWD
cd "$SHIM"

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
  } 2>&1 | tee "$OUT/build.log" | tail -20
fi

if has test; then
  T=$REPO/tests/custom_ops
  timeout 240 python3 -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -q -rs -p no:cacheprovider \
    $T/test_cuda_cpu.py $T/test_cuda_msda.py $T/test_cuda_rotate.py $T/test_cuda_dcn.py $T/test_cuda_trt_abi.py \
    --durations=5 2>&1 | tee "$OUT/pytest.log" | tail -40
fi

if has sanitize; then
  timeout 240 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -c "$REPO/pyproject.toml" \
    --rootdir "$REPO" -q -x -p no:cacheprovider "$REPO/tests/custom_ops/test_cuda_msda.py" \
    -k "odd or border or misaligned" 2>&1 | tee "$OUT/sanitize.log" | tail -8
fi

if has ncu; then
  M=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__throughput.avg.pct_of_peak_sustained_active,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
  timeout 150 ncu --clock-control none --metrics $M -k regex:msda --csv python3 "$REPO/benchmarks/gpu_profile.py" \
    > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  python3 - "$OUT/ncu.csv" <<'PY' | tee "$OUT/ncu.log"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, body = rows[0], rows[1:]
k, n, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
ids = head.index("ID")
table = {}
for r in body:
    table.setdefault((r[ids], r[k]), {})[r[n].split("__")[1].split(".")[0]] = r[v]
for (i, name), m in table.items():
    print(f"{name[:26]:26}", " ".join(f"{a}={b}" for a, b in m.items()))
PY
fi

if has ops; then
  timeout 220 python3 "$REPO/benchmarks/gpu_ops.py" --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.log" | tail -45
fi

if has frame; then
  timeout 150 python3 "$REPO/benchmarks/gpu_frame.py" --json "$OUT/frame.json" 2>&1 | tee "$OUT/frame.log" | tail -12
fi
cd "$REPO" && rm -rf "$SHIM"
