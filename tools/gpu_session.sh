#!/usr/bin/env bash
# One lease on a GPU machine (an H100/H200, 16 cores; no registry there): build, the GPU tests,
# the triton backend's per-pass times against cuBLAS, the layer-level report, compute-sanitizer.
# Every step has its own time limit, cut to what is left of DEADLINE seconds (default 540), so the
# whole run ends inside one 10-minute call; a step that fails does not stop the next.
#   tools/gpu_session.sh [all|tests|passes|report|sanitize]      (default: all, in that order)
# Results under $OUT (default /tmp/vcreg_gpu_out), at most 8 files: session.log (everything
# printed, versions first), tests.log, passes.md, report/report.{md,json,png}.
set -uo pipefail
export PYTHONUNBUFFERED=1
what=${1:-all}
OUT=${OUT:-/tmp/vcreg_gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
DEADLINE=${DEADLINE:-540}
exec > >(tee -a "$OUT/session.log") 2>&1
t_start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t_start )) s"; }
want() { [[ $what == all || $what == "$1" ]]; }
# limit SECONDS: the step's limit, or what is left before the deadline (0: skip the step)
limit() { local left=$(( DEADLINE - ($(date +%s) - t_start) )); (( left < 30 )) && echo 0 || echo $(( left < $1 ? left : $1 )); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'SMs', torch.cuda.get_device_properties(0).multi_processor_count)"
  date -u; }

echo "== build ($(elapsed))"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  timeout 300 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.tmp" 2>&1 \
  || { tail -40 "$OUT/build.tmp"; echo "build failed"; exit 1; }
rm -f "$OUT/build.tmp"

if (( $(limit 90) > 0 )); then
  echo "== Triton's cache: what the section-7 shapes launch, compiled in parallel ($(elapsed))"
  timeout "$(limit 90)" $PY tools/triton_warm_cache.py --jobs "${MAX_JOBS:-16}"
fi

if want tests && (( $(limit 150) > 0 )); then
  echo "== pytest -m gpu at the heuristic configurations (the autotuner's own test turns it on) ($(elapsed))"
  VCREG_TRITON_AUTOTUNE=0 timeout "$(limit 150)" $PY -m pytest tests -m gpu -q -p no:cacheprovider -rfE \
    --durations=5 > "$OUT/tests.log" 2>&1
  echo "tests: rc=$?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if want passes && (( $(limit 120) > 0 )); then
  echo "== triton passes against cuBLAS, ResNet-50 s1 and s4 ($(elapsed))"
  timeout "$(limit 120)" $PY -m bench.triton_tune --shapes "ResNet-50 s1,ResNet-50 s4" \
    --dtypes bfloat16,float32 --settings highest,high --out "$OUT/passes.md" > /dev/null
  echo "passes: rc=$?"; cat "$OUT/passes.md" 2>/dev/null
fi

if want report && (( $(limit 180) > 0 )); then
  echo "== layer-level report ($(elapsed))"
  timeout "$(limit 180)" $PY -m bench.report --no-network --no-compile --no-cpu-ratios \
    --out "$OUT/report" > "$OUT/report.tmp" 2>&1
  echo "report: rc=$?"; grep -v "^\[" "$OUT/report.tmp" | tail -50; rm -f "$OUT/report.tmp"
fi

if want sanitize && (( $(limit 90) > 0 )); then
  echo "== compute-sanitizer memcheck on the cuda and triton backwards and the cuda pair kernels, rows/bdl layouts ($(elapsed))"
  VCREG_TRITON_AUTOTUNE=0 timeout "$(limit 90)" compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest tests/test_kernels.py tests/test_vicreg.py -q -p no:cacheprovider \
    -k "(test_backward and (cuda-cuda or triton-cuda) and (float32 or bfloat16) and (150x37x1 or 4x24x32 or 20x33x7) and 0.0-None) or (cuda_pair_kernels_match and (float32 or bfloat16) and (1031x257x1 or 20x33x7))" \
    2>&1 | grep -E "ERROR SUMMARY|Invalid|passed|failed" | head -10
  echo "memcheck: rc=${PIPESTATUS[0]}"
fi
echo "== done ($(elapsed))"
