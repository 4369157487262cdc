#!/usr/bin/env bash
# Quick start, command 1: set qdqkit up on a fresh machine and run the BEVFormer-tiny recipe end to end
# (export with TensorRT plugin ops, synthetic temporal calibration data, detect -> trt.plugins -> shapes ->
# ModelOpt INT8 Q/DQ calibrated on the CPU -> simplify -> validate on held-out frames, and the report).
# Usage: bash examples/bevformer/run.sh [demo options, e.g. --recipe both --calib-samples 16]
set -euo pipefail
cd "$(dirname "$0")/../.."
# torch first, pinned: a CPU build is on the local package mirror; anything unpinned would pull a multi-GB CUDA build
# (nvidia-modelopt depends on torch).
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[example]"
exec python3 -m qdqkit.examples.bevformer demo "$@"
