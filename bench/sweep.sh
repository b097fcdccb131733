#!/usr/bin/env bash
# The benchmark sweep behind the README table, in parts (each fits one call on a GPU machine);
# merge the parts' JSON with bench/merge.py. Usage: bench/sweep.sh PART [PART...]
#   main   fp16+bf16, D=128, Hkv=8, N=4K..64K, ours + SDPA flash/cuDNN/efficient
#   shapes fp16, D=64 and Hkv=32 at N=8K..32K, ours + SDPA flash/cuDNN
#   extra  one non-causal row (N=16K), N=128K for the main shape, FlexAttention on two sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bsfa_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bench() { python3 -m bsfa_cupy bench --quiet --out "$OUT" "$@" 2>&1 | grep -E '^(bsfa|sdpa|flex)' ; }
for part in "$@"; do
  case $part in
    main) bench --tag main --n 4096 8192 16384 32768 65536 --d 128 --hkv 8 --dtype float16 bfloat16 \
            --peers sdpa-flash sdpa-cudnn sdpa-efficient ;;
    shapes) bench --tag d64 --n 8192 16384 32768 --d 64 --hkv 8 --dtype float16 --peers sdpa-flash sdpa-cudnn
            bench --tag hkv32 --n 8192 16384 32768 --d 128 --hkv 32 --dtype float16 --peers sdpa-flash sdpa-cudnn ;;
    extra) bench --tag noncausal --n 16384 --d 128 --hkv 8 --dtype float16 --noncausal --no-calibrated \
             --peers sdpa-flash sdpa-cudnn
           bench --tag n128k --n 131072 --d 128 --hkv 8 --dtype float16 --repeats 3 --no-calibrated \
             --peers sdpa-flash sdpa-cudnn
           bench --tag flex --n 16384 32768 --d 128 --hkv 8 --dtype float16 --peers-only --peers flex ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
ls "$OUT"/*.json
