# Sourced, from the repository root, by the scripts that run on the GPU machine (benchmarks/gpu_run.sh,
# benchmarks/experiments/*/run.sh). That machine has no qdqkit installed: lay the source tree out as the installed
# package would be (setup.py's package_dir) with symbolic links in a temporary folder, put it first on PYTHONPATH,
# set REPO to the checkout, and work from the shim (from the checkout, Python would find its bare qdqkit/, without
# the sub-packages, first). Nothing is built or written into the checkout.
REPO=$PWD
SHIM=$(mktemp -d)
mkdir -p "$SHIM/qdqkit"
for f in qdqkit/*; do ln -s "$PWD/$f" "$SHIM/qdqkit/"; done
ln -s "$PWD/passes" "$SHIM/qdqkit/passes"
ln -s "$PWD/custom_ops" "$SHIM/qdqkit/custom_ops"
ln -s "$PWD/examples" "$SHIM/qdqkit/examples"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
cd "$SHIM" || exit 1
