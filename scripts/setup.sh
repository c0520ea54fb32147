#!/usr/bin/env bash
# Sets up a fresh machine and installs anyexperts_ops: torch, build tools, CUTLASS headers,
# then `pip install --no-build-isolation .` (the extension links the torch installed here).
# CUDA kernels are built when nvcc and a CUDA build of torch are present; ANYEXPERTS_CUDA=1
# forces them (and fails if impossible), ANYEXPERTS_CUDA=0 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
"$py" -m pip install -q -r requirements-build.txt
"$py" -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
# -v shows the compiler lines (nvcc included) in the log.
"$py" -m pip install -v --no-build-isolation --no-deps .
