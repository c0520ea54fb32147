#!/usr/bin/env bash
# One call on a lent GPU machine: build for sm_90a, run the tests, run the benchmarks.
# STEPS picks stages ("build test bench" by default); logs and results go to $OUT.
# TESTS picks test files (the CUDA kernels' and the layer's by default; TESTS=tests for all).
# BENCHES picks benchmarks ("routing grouped_mm" by default): routing, grouped_mm, layer,
# profile (bench/profile.py at E128: AnyExperts Avg-K 4.8 and static top-8),
# grouped_mm_sweep (bench_grouped_mm.py --sweep: every SM90 schedule x raster x swizzle
# against torch._grouped_mm, to choose the grouped GEMM default from), or grouped_mm_sm80
# (bench_grouped_mm.py with the CUTLASS 2.x Ampere kernels forced). The sweep alone:
#   STEPS="build bench" BENCHES=grouped_mm_sweep bash bench/gpu_session.sh
# CUTLASS headers come from a carried nvidia-cutlass wheel in .whl/ (the machine has no network).
# Set ANYEXPERTS_COMMIT to the commit the tree holds: a copied tree's .git may be older.
# The device tool brings back only a few files from its $OUT: point OUT elsewhere and tar it
# into the tool's $OUT at the end of the command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ae-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
steps=${STEPS:-build test bench}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

if [[ $steps == *build* ]]; then
  t0=$(date +%s)
  ANYEXPERTS_CUDA=ON ANYEXPERTS_CUDA_ARCHS=90a MAX_JOBS=$(nproc) scripts/dev_build.sh \
    >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH=$PWD/python:${PYTHONPATH:-}

if [[ $steps == *test* ]]; then
  t0=$(date +%s)
  # a per-test limit where the pytest-timeout plugin is installed (not a requirement)
  per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=120)
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rfEs $per_test -p no:cacheprovider \
    ${TESTS:-tests/test_cuda_routing.py tests/test_cuda_grouped_mm.py tests/test_cuda_swiglu.py tests/test_cuda_hsm.py tests/test_cuda_add_virtual.py tests/test_double_backward.py tests/test_dead_rows.py tests/test_layer.py tests/test_layer_lifecycle.py tests/test_layer_recompute.py tests/test_layer_router_dtype.py} >"$OUT/tests.log" 2>&1
  echo "tests: rc=$? in $(( $(date +%s) - t0 )) s"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
fi

if [[ $steps == *bench* ]]; then
  for b in ${BENCHES:-routing grouped_mm}; do
    t0=$(date +%s)
    case $b in
      profile)  # per-stage table of one E128 AnyExperts step (Avg-K 4.8) and of static top-8
        for v in anyexperts static; do
          timeout ${BENCH_TIMEOUT:-180} python3 bench/profile.py --shape e128 --variant $v \
            --profiler torch --json "$OUT/profile_e128_$v.json" >"$OUT/profile_e128_$v.txt" 2>&1
          echo "profile $v: rc=$?"; grep -A 14 "^Per-stage" "$OUT/profile_e128_$v.txt"
        done
        continue ;;
      grouped_mm_sweep) script=bench/bench_grouped_mm.py; extra=--sweep; limit=540 ;;
      grouped_mm_sm80)  # the CUTLASS 2.x (Ampere) kernels, on this GPU, beside the same baselines
        timeout ${BENCH_TIMEOUT:-240} env ANYEXPERTS_GROUPED_MM_BACKEND=sm80 python3 \
          bench/bench_grouped_mm.py --out "$OUT/$b.json" >"$OUT/bench_$b.log" 2>&1
        echo "bench $b: rc=$? in $(( $(date +%s) - t0 )) s"; cat "$OUT/$b.md" 2>/dev/null
        continue ;;
      layer) script=bench/bench_layer.py; extra=; limit=420 ;;  # + inductor compiles
      grouped_mm) script=bench/bench_grouped_mm.py; extra=; limit=360 ;;  # + serving shapes
      *) script=bench/bench_$b.py; extra=; limit=240 ;;
    esac
    timeout ${BENCH_TIMEOUT:-$limit} python3 "$script" $extra --out "$OUT/$b.json" \
      ${BENCH_ARGS:-} >"$OUT/bench_$b.log" 2>&1
    echo "bench $b: rc=$? in $(( $(date +%s) - t0 )) s"
    # The sweep's table of every row is long: show its summary (the rest is in $OUT).
    [ -f "$OUT/$b.md" ] && sed '/^## All rows/,$d' "$OUT/$b.md" || tail -20 "$OUT/bench_$b.log"
  done
fi
