"""One dense and one sparse (rho ~ 0.25) forward launch for a profiler, after two warm-up calls.

Usage: ncu -k bsfa_fwd --launch-skip 2 -c 2 ... python bench/profile_fwd.py [--n 8192] [--mma-sync]
"""
import argparse

import cupy as cp

import bsfa_cupy
from bsfa_cupy import _kernels
from bsfa_cupy.tools.benchmark import thresholds_for_rho

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=8192)
p.add_argument("--d", type=int, default=128)
p.add_argument("--rho", type=float, default=0.25)
p.add_argument("--mma-sync", action="store_true")
args = p.parse_args()

rng = cp.random.default_rng(0)
q = rng.standard_normal((1, args.n, 32, args.d), dtype=cp.float32).astype(cp.float16)
k = rng.standard_normal((1, args.n, 8, args.d), dtype=cp.float32).astype(cp.float16)
v = rng.standard_normal((1, args.n, 8, args.d), dtype=cp.float32).astype(cp.float16)
with _kernels.tuning(sm90=not args.mma_sync):
    thr = thresholds_for_rho(bsfa_cupy.block_max_scores(q, k)[0], args.rho, args.n)
    for _ in range(2):
        bsfa_cupy.attention(q, k, v)
    bsfa_cupy.attention(q, k, v)
    bsfa_cupy.attention(q, k, v, thr)
cp.cuda.Device().synchronize()
print("done")
