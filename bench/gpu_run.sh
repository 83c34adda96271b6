#!/usr/bin/env bash
# The GPU runs in one command (for the lent H200, or any CUDA machine with torch and Triton):
#   bash bench/gpu_run.sh [--parts env,tiny,sweep,perf,realsize]
# Installs wheels carried in .whl/ (mm_convert itself, built here with
# `pip wheel --no-deps --no-build-isolation -w .whl .`; flashinfer-python 0.6.13 + apache-tvm-ffi, to
# show why the FlashInfer backends skip), runs bench/gpu_kernel.py, prints a short table last;
# results.json goes to $OUT (or /tmp/gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
python3 bench/gpu_kernel.py --out "${OUT:-/tmp/gpu-out}" "$@"
