#!/usr/bin/env bash
# Sets up qdqkit with its test dependencies on a fresh machine and runs the test suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: a CPU build is on the local package mirror; anything unpinned would pull a multi-GB CUDA build
# (nvidia-modelopt depends on torch).
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
exec python3 -m pytest "$@"
