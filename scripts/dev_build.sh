#!/usr/bin/env bash
# Developer build: compiles anyexperts_ops._C into python/anyexperts_ops/ so that
# `PYTHONPATH=python` uses the source tree. BUILD_DIR and ANYEXPERTS_CUDA (ON/OFF) select
# the build (ANYEXPERTS_CUDA_ARCHS its archs); extra arguments go to `cmake --build` (e.g. a single object as the target).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build/dev-${ANYEXPERTS_CUDA:-OFF}}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
cmake -S "$root" -B "$build" -G Ninja -DPython3_EXECUTABLE="$(command -v python3)" \
  -DANYEXPERTS_CUDA="${ANYEXPERTS_CUDA:-OFF}" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -DANYEXPERTS_CUDA_ARCHS="${ANYEXPERTS_CUDA_ARCHS:-80;90a}" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="${OUT_DIR:-$root/python/anyexperts_ops}" >/dev/null
cmake --build "$build" -j "${MAX_JOBS:-2}" "$@"
