#!/usr/bin/env bash
# The benchmark sweep behind the README table, in parts (a few fit one call on a GPU machine), each part
# one `python3 -m bsfa_cupy bench` run (backend "auto": the wgmma kernel on Hopper) written to $OUT as
# GPU_DATE_TAG-PART.{json,md,png}; merge the parts' JSON with bench/merge.py, e.g.
#   python3 bench/merge.py v8-sweep $OUT/*_v8-main-fp16.json $OUT/*_v8-main-bf16.json ... --out bench/results
# Usage: TAG=name [OUT=dir] [BENCH_ARGS=...] bench/sweep.sh PART [PART...]   (OUT default /tmp/bsfa_bench;
#   BENCH_ARGS go to every bench run, e.g. "--warmup-ms 0" for the timing protocol before v32)
#   main-fp16 main-bf16          D=128, Hkv=8, N=8K..64K, ours + SDPA flash/cuDNN
#   d64 hkv32 hkv32-bf16         D=64 (fp16, N=8K..32K); Hkv=32 (N=8K..64K)
#   4k noncausal n128k flex      4K both dtypes, a non-causal row (16K), N=128K, FlexAttention at 16K/32K
#   bar-dense                    the Hopper bar's dense points: D=128, fp16/bf16, Hkv 8/32, N=8K..128K, cuDNN
#                                (one sparse row, rho 0.25, each)
#   bar-sparse                   fp16, Hkv=8, N=16K..64K at rho 0.5/0.25/0.1, block_max, cuDNN
#   bar-shapes                   non-causal 16K, D=64 32K, B=8 N=2K, B=32 N=1K, cuDNN
#   groups: main = main-fp16 main-bf16; shapes = d64 hkv32 hkv32-bf16; extra = 4k noncausal n128k flex;
#           bar = bar-dense bar-sparse bar-shapes
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bsfa_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T=${TAG:?"set TAG, the name of this sweep: result tags are TAG-PART, e.g. TAG=v8 gives v8-main-fp16"}
peers=(--peers sdpa-flash sdpa-cudnn)
# A fresh machine has no bsfa_cupy: install the tree in place as gpu_check.sh does (or run from it), so that a
# part never fails unseen behind the filter below.
python3 -c "import bsfa_cupy" 2>/dev/null \
  || python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "editable install failed (see $OUT/install.log), running from the tree"; export PYTHONPATH=$PWD; }
# The rows of one part as they come; its whole output in $OUT/sweep.log, and its tail where it fails.
bench() {
  local rc
  echo "---- bench $* ${BENCH_ARGS:-}" >>"$OUT/sweep.log"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  python3 -m bsfa_cupy bench --quiet --out "$OUT" "$@" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/sweep.log" | grep -E '^(bsfa|sdpa|flex)'
  rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    echo "bench $* failed (exit $rc):"
    tail -n 8 "$OUT/sweep.log"
  fi
  return "$rc"
}
parts=()
for p in "$@"; do
  case $p in
    main) parts+=(main-fp16 main-bf16) ;;
    shapes) parts+=(d64 hkv32 hkv32-bf16) ;;
    extra) parts+=(4k noncausal n128k flex) ;;
    bar) parts+=(bar-dense bar-sparse bar-shapes) ;;
    *) parts+=("$p") ;;
  esac
done
for part in "${parts[@]}"; do
  case $part in
    main-fp16) bench --tag "$T"-main-fp16 --n 8192 16384 32768 65536 --d 128 --hkv 8 --dtype float16 "${peers[@]}" ;;
    main-bf16) bench --tag "$T"-main-bf16 --n 8192 16384 32768 65536 --d 128 --hkv 8 --dtype bfloat16 "${peers[@]}" \
                 --no-calibrated ;;
    d64) bench --tag "$T"-d64 --n 8192 16384 32768 --d 64 --hkv 8 --dtype float16 "${peers[@]}" --no-calibrated ;;
    hkv32) bench --tag "$T"-hkv32 --n 8192 16384 32768 65536 --d 128 --hkv 32 --dtype float16 "${peers[@]}" \
             --no-calibrated ;;
    hkv32-bf16) bench --tag "$T"-hkv32-bf16 --n 8192 16384 32768 65536 --d 128 --hkv 32 --dtype bfloat16 \
                  "${peers[@]}" --no-calibrated ;;
    4k) bench --tag "$T"-4k --n 4096 --d 128 --hkv 8 --dtype float16 bfloat16 "${peers[@]}" ;;
    noncausal) bench --tag "$T"-noncausal --n 16384 --d 128 --hkv 8 --dtype float16 --noncausal --no-calibrated \
                 "${peers[@]}" ;;
    n128k) bench --tag "$T"-n128k --n 131072 --d 128 --hkv 8 --dtype float16 --repeats 3 --no-calibrated "${peers[@]}" ;;
    flex) bench --tag "$T"-flex --n 16384 32768 --d 128 --hkv 8 --dtype float16 --peers-only --peers flex ;;
    bar-dense) bench --tag "$T"-bar-dense --n 8192 16384 32768 65536 131072 --d 128 --hkv 8 32 \
                 --dtype float16 bfloat16 --peers sdpa-cudnn --no-calibrated --no-blockmax --rhos 0.25 --repeats 5 ;;
    bar-sparse) bench --tag "$T"-bar-sparse --n 16384 32768 65536 --d 128 --hkv 8 --dtype float16 \
                  --peers sdpa-cudnn --no-calibrated --rhos 0.5 0.25 0.1 ;;
    bar-shapes) bench --tag "$T"-bar-nc16k --n 16384 --d 128 --hkv 8 --dtype float16 --noncausal --no-calibrated \
                  --no-blockmax --rhos 0.25 --peers sdpa-cudnn
                bench --tag "$T"-bar-d64 --n 32768 --d 64 --hkv 8 --dtype float16 --no-calibrated --no-blockmax \
                  --rhos 0.25 --peers sdpa-cudnn
                bench --tag "$T"-bar-b8 --b 8 --n 2048 --d 128 --hkv 8 --dtype float16 --no-calibrated --no-blockmax \
                  --rhos 0.25 --peers sdpa-cudnn
                bench --tag "$T"-bar-b32 --b 32 --n 1024 --d 128 --hkv 8 --dtype float16 --no-calibrated \
                  --no-blockmax --rhos 0.25 --peers sdpa-cudnn ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
ls "$OUT"/*.json
