#!/usr/bin/env bash
# One batch of work on a GPU machine: versions, build, the whole test suite, then the report.
#   tools/gpu_session.sh [tests|report|all] [extra args for bench.report]
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
  $PY -m pytest tests -q --maxfail=25 -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [[ $what == report || $what == all ]]; then
  $PY -m bench.report --out "$OUT/report" "$@" 2>&1 | tee "$OUT/report.log" | tail -80
fi
