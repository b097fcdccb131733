#!/usr/bin/env bash
# The benchmark sweep behind the README table, in parts (each fits one call on a GPU machine);
# merge the parts' JSON with bench/merge.py, e.g.
#   python bench/merge.py wgmma-sweep OUT/*_wgmma-main-fp16.json OUT/*_wgmma-main-bf16.json ...
# Usage: bench/sweep.sh PART [PART...]
#   main   fp16 and bf16 (one part each), D=128, Hkv=8, N=8K..64K, ours + SDPA flash/cuDNN
#   shapes D=64 (fp16, N=8K..32K) and Hkv=32 (fp16 and bf16, N=8K..64K), ours + SDPA flash/cuDNN
#   extra  4K, one non-causal row (N=16K), N=128K for the main shape, FlexAttention on two sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bsfa_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bench() { python3 -m bsfa_cupy bench --quiet --out "$OUT" "$@" 2>&1 | grep -E '^(bsfa|sdpa|flex)' ; }
for part in "$@"; do
  case $part in
    main) bench --tag wgmma-main-fp16 --n 8192 16384 32768 65536 --d 128 --hkv 8 --dtype float16 \
            --peers sdpa-flash sdpa-cudnn
          bench --tag wgmma-main-bf16 --n 8192 16384 32768 65536 --d 128 --hkv 8 --dtype bfloat16 \
            --peers sdpa-flash sdpa-cudnn --no-calibrated ;;
    shapes) bench --tag wgmma-d64 --n 8192 16384 32768 --d 64 --hkv 8 --dtype float16 --peers sdpa-flash sdpa-cudnn \
              --no-calibrated
            bench --tag wgmma-hkv32 --n 8192 16384 32768 65536 --d 128 --hkv 32 --dtype float16 \
              --peers sdpa-flash sdpa-cudnn --no-calibrated
            bench --tag wgmma-hkv32-bf16 --n 8192 16384 32768 65536 --d 128 --hkv 32 --dtype bfloat16 \
              --peers sdpa-flash sdpa-cudnn --no-calibrated ;;
    extra) bench --tag wgmma-4k --n 4096 --d 128 --hkv 8 --dtype float16 bfloat16 --peers sdpa-flash sdpa-cudnn
           bench --tag wgmma-noncausal --n 16384 --d 128 --hkv 8 --dtype float16 --noncausal --no-calibrated \
             --peers sdpa-flash sdpa-cudnn
           bench --tag wgmma-n128k --n 131072 --d 128 --hkv 8 --dtype float16 --repeats 3 --no-calibrated \
             --peers sdpa-flash sdpa-cudnn
           bench --tag flex --n 16384 32768 --d 128 --hkv 8 --dtype float16 --peers-only --peers flex ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
ls "$OUT"/*.json
