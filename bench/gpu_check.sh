#!/usr/bin/env bash
# One call on a GPU machine: install, GPU tests, sanitizers, a quick benchmark; a summary table last.
# Usage: bench/gpu_check.sh [stage ...]   stages: tests sanitize bench (default: all three)
# Needs only the machine's Python with CuPy >= 14, torch, pytest and hypothesis; downloads nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bsfa_gpu_check}
mkdir -p "$OUT"
stages=${*:-tests sanitize bench}
export PYTHONUNBUFFERED=1
declare -A status

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "editable install failed, running from the tree"; export PYTHONPATH=$PWD; }
python3 -c "import bsfa_cupy, cupy; print('bsfa_cupy from', bsfa_cupy.__file__, '| cupy', cupy.__version__)"

for stage in $stages; do
  case $stage in
    tests)
      HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu} python3 -m pytest -m gpu -q -p no:cacheprovider \
        --junitxml="$OUT/junit.xml" tests 2>&1 | tee "$OUT/tests.log"
      status[tests]=$(tail -n 1 "$OUT/tests.log")
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_cases.py >"$OUT/sanitize_$tool.log" 2>&1
        rc=$?
        status[$tool]="exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -n 1)"
      done
      ;;
    bench)
      python3 -m bsfa_cupy bench --quiet --n ${BENCH_N:-8192 16384} --d 128 --hkv 8 --dtype float16 \
        --peers sdpa-flash sdpa-cudnn --out "$OUT" --tag quick 2>&1 | tee "$OUT/bench.log" | grep -E '^(bsfa|sdpa)'
      status[bench]=$(ls "$OUT"/*quick.json 2>/dev/null | head -n 1)
      ;;
  esac
done

echo
echo "==== summary ($(head -n 1 "$OUT/gpu.txt")) ===="
for key in "${!status[@]}"; do printf '%-10s %s\n' "$key" "${status[$key]}"; done
if [ -f "$OUT/bench.log" ]; then grep -E '^(bsfa-dense|bsfa-sparse|sdpa)' "$OUT/bench.log" | tail -n 20; fi
