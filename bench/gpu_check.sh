#!/usr/bin/env bash
# One call on a GPU machine: install, compile every kernel variant, the GPU tests, three compute-sanitizer
# tools on bench/sanitize_cases.py and a quick benchmark; a summary last. Exit status 0 when every stage passed.
# Usage: [OUT=dir] bench/gpu_check.sh [stage ...]
#   stages: compile tests memcheck racecheck synccheck bench (default: all; "sanitize" = the three tools)
# The compile stage (bench/warm_cache.py, ~10 s cold) names any variant that fails to compile before the tests run.
# Everything goes to $OUT (default /tmp/bsfa_gpu_check): gpu.txt install.log compile.log tests.log junit.xml
# sanitize_{memcheck,racecheck,synccheck}.log bench.log, the benchmark's *_quick.{json,md,png}, summary.txt.
# Time limits: each stage its own (seconds; env T_COMPILE T_TESTS T_MEMCHECK T_RACECHECK T_SYNCCHECK T_BENCH;
# racecheck, the slow tool, gets 300: over every kernel's cases it outgrew 90 s once split-KV joined them)
# and the whole call T_TOTAL (default 570 s), so it ends within ~10 minutes on a fresh machine. With three kernels
# on Hopper the stages no longer fit one such call: run `gpu_check.sh compile tests` (the GPU suite with the
# hypothesis profile `ci` took ~4.6 minutes on an H200 with every entry's tests; without the compile stage
# every changed variant compiles inside the tests, one after another, and even two test files outgrow a call;
# PYTEST_ADDOPTS="-k ..." or "--deselect ..." splits them over two calls if they outgrow one) and
# `gpu_check.sh compile sanitize bench` as two calls.
# HYPOTHESIS_PROFILE (default ci) picks the examples; `gpu` draws many more and needs a longer T_TESTS.
# SANITIZE_ARGS go to sanitize_cases.py, e.g. "--backend sm90ws --clusters" for the sm90ws cluster entries
# ("--backend sm90ws --pair-tiles" for the tile-pair entry).
# Needs only the machine's Python with CuPy >= 14, torch, pytest and hypothesis; downloads nothing.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bsfa_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${T_TOTAL:-570}))

stages=()
for arg in "${@:-compile tests sanitize bench}"; do
  for s in $arg; do
    case $s in
      sanitize) stages+=(memcheck racecheck synccheck) ;;
      compile | tests | memcheck | racecheck | synccheck | bench) stages+=("$s") ;;
      *) echo "unknown stage $s (stages: compile tests sanitize memcheck racecheck synccheck bench)"; exit 2 ;;
    esac
  done
done
declare -A limit=([compile]=${T_COMPILE:-60} [tests]=${T_TESTS:-500} [memcheck]=${T_MEMCHECK:-120}
                  [racecheck]=${T_RACECHECK:-300} [synccheck]=${T_SYNCCHECK:-60} [bench]=${T_BENCH:-90})
declare -A status seconds

# run STAGE LOG CMD...: CMD with output to LOG, within the stage's limit and the call's deadline.
run() {
  local stage=$1 log=$2 t0=$SECONDS lim=${limit[$1]} rc
  shift 2
  if ((deadline - SECONDS < lim)); then lim=$((deadline - SECONDS)); fi
  if ((lim < 10)); then
    status[$stage]="SKIPPED (no time left)"
    seconds[$stage]=0
    return 1
  fi
  echo "---- $stage (limit $lim s)"
  timeout --kill-after=15 "$lim" "$@" >"$log" 2>&1
  rc=$?
  seconds[$stage]=$((SECONDS - t0))
  case $rc in
    0) status[$stage]="ok" ;;
    124 | 137) status[$stage]="TIMED OUT after $lim s" ;;
    *) status[$stage]="FAILED (exit $rc)" ;;
  esac
  return $rc
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "editable install failed (see install.log), running from the tree"; export PYTHONPATH=$PWD; }
python3 -c "import bsfa_cupy, cupy; print('bsfa_cupy from', bsfa_cupy.__file__, '| cupy', cupy.__version__)" \
  2>&1 | tee -a "$OUT/gpu.txt"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo compute-sanitizer)

for stage in "${stages[@]}"; do
  case $stage in
    compile)
      run compile "$OUT/compile.log" python3 bench/warm_cache.py
      status[compile]+="; $(tail -n 1 "$OUT/compile.log" 2>/dev/null)"
      ;;
    tests)
      run tests "$OUT/tests.log" env HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" \
        python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/junit.xml" tests
      grep -E '^(FAILED|ERROR)' "$OUT/tests.log" 2>/dev/null | head -n 20
      last=$(tail -n 1 "$OUT/tests.log" 2>/dev/null)
      if [[ ${status[tests]} == ok && $last != *passed* ]]; then status[tests]="FAILED (no GPU test ran)"; fi
      status[tests]+="; $last"
      ;;
    memcheck | racecheck | synccheck)
      # --report-api-errors no: NVIDIA's cuda-bindings (the TMA kernel's tensor maps) probes driver entry
      # points with cuGetProcAddress at import, and the misses would count as errors; the kernels' own
      # CUDA calls are checked by CuPy, which raises on any failure.
      # shellcheck disable=SC2086  # SANITIZE_ARGS is a list of arguments
      run "$stage" "$OUT/sanitize_$stage.log" "$sanitizer" --tool "$stage" --report-api-errors no --error-exitcode 9 \
        python3 bench/sanitize_cases.py ${SANITIZE_ARGS:-}
      status[$stage]+="; $(grep -hE '(ERROR|RACECHECK) SUMMARY' "$OUT/sanitize_$stage.log" 2>/dev/null | tail -n 1 | sed 's/^=* *//')"
      status[$stage]+="; $(grep -hE '^(sanitize cases ran|NaN |[A-Za-z.]*(Error|Exception)\b)' "$OUT/sanitize_$stage.log" \
        2>/dev/null | tail -n 3 | tr '\n' ' ')"
      # A run cut short: the group of calls it was in (sanitize_cases.py prints one line as each starts).
      [[ ${status[$stage]} == ok* ]] || status[$stage]+="; last $(grep -h '^case:' "$OUT/sanitize_$stage.log" 2>/dev/null | tail -n 1)"
      ;;
    bench)
      # shellcheck disable=SC2086  # BENCH_N is a list of sizes
      run bench "$OUT/bench.log" python3 -m bsfa_cupy bench --quiet --n ${BENCH_N:-8192 16384} --d 128 --hkv 8 \
        --dtype float16 --peers sdpa-flash sdpa-cudnn --out "$OUT" --tag quick
      quick=$(find "$OUT" -maxdepth 1 -name '*_quick.json' | head -n 1)
      status[bench]+="; ${quick:-no result file}"
      ;;
  esac
  status[$stage]=$(sed -E 's/(; *)+$//; s/ +$//' <<<"${status[$stage]}")
  echo "$stage: ${status[$stage]}"
done

failed=0 verdict="all passed"
for stage in "${stages[@]}"; do [[ ${status[$stage]} == ok* ]] || { failed=1; verdict="FAILED"; }; done
{
  echo
  echo "==== summary: $(head -n 1 "$OUT/gpu.txt"); $SECONDS s in all; $verdict ===="
  for stage in "${stages[@]}"; do printf '%-10s %4s s  %s\n' "$stage" "${seconds[$stage]}" "${status[$stage]}"; done
  if [[ -f $OUT/bench.log ]]; then grep -E '^(bsfa|sdpa)' "$OUT/bench.log" | tail -n 20; fi
  echo "logs in $OUT"
} | tee "$OUT/summary.txt"
exit $failed
