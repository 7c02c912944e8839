#!/usr/bin/env bash
# One batch of work on a GPU machine (no registry there): versions, build, the whole test suite,
# compute-sanitizer over the CUDA backend's tests, then the latency report; or the Triton sweep.
#   tools/gpu_session.sh [all|tests|report] [arguments for bench.report]
#   tools/gpu_session.sh tune [arguments for bench.triton_tune, e.g. --shapes ResNet-50]
# Logs and results go to $OUT (default /tmp/vcreg_gpu_out).
set -uo pipefail
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/vcreg_gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u; } | tee "$OUT/device.txt"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
if [[ $what == tests || $what == all ]]; then
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest tests -q -p no:cacheprovider -rs --durations=10 \
    2>&1 | tee "$OUT/tests.log" | grep -v "^SKIPPED" | tail -30
  for tool in memcheck racecheck; do
    timeout "${SANITIZER_TIMEOUT:-90}" compute-sanitizer --tool $tool --error-exitcode 9 \
      $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "backward_kernel_matches_reference and None-all and float32" \
      > "$OUT/sanitizer-$tool.log" 2>&1
    echo "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer-$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi
if [[ $what == tune ]]; then
  timeout "${TUNE_TIMEOUT:-480}" $PY -m bench.triton_tune --out "$OUT/sweep.md" "$@" > "$OUT/tune.log" 2>&1
  echo "tune: rc=$?"; tail -60 "$OUT/tune.log"
fi
if [[ $what == report || $what == all ]]; then
  timeout "${REPORT_TIMEOUT:-300}" $PY -m bench.report --out "$OUT/report" "$@" > "$OUT/report.log" 2>&1
  echo "report: rc=$?"; grep -v "^\[" "$OUT/report.log" | tail -40
fi
