#!/usr/bin/env bash
# Session 10 experiment (issue 6, GPU_NOTES.md round 7): register use of the SCA fp16 cooperative kernel with each
# lane's point prepared just before use (lazy.cuh, appended to the shipped msda.cu text), against the shipped
# msda_co_lp8_fp16. Needs only nvcc (no GPU): prints ptxas's registers and spills for sm_90. Run from the
# repository root with qdqkit importable.
set -euo pipefail
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
python3 -c "from qdqkit.custom_ops.cuda import _build; import sys; sys.stdout.write(_build.source('msda'))" > "$D/x.cu"
cat "$(dirname "$0")/lazy.cuh" >> "$D/x.cu"
nvcc -arch=sm_90 -cubin -Xptxas -v -o "$D/x.cubin" "$D/x.cu" 2>&1 \
  | grep -A3 -E "'(msda_x_[a-z0-9_]+|msda_co_lp8_fp16)'" | grep -E "Compiling|registers|spill" | paste - - -
