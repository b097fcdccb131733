"""One dense and one sparse (rho ~ 0.25) forward launch for a profiler, after two warm-up calls.

Usage: ncu -k bsfa_fwd --launch-skip 2 -c 2 ... python bench/profile_fwd.py [--n 8192] [--backend sm80]
       ncu -k bsfa_block_max --launch-skip 2 -c 1 ... python bench/profile_fwd.py --block-max [--n 16384]
       ncu -k regex:bsfa_fwd_split --launch-skip 2 -c 2 ... python bench/profile_fwd.py --nq 128 --n 131072
B=1, Hq=32, Hkv=8 (--hkv), float16, causal; --backend as in bsfa_cupy.attention ("auto": wgmma on Hopper).
--block-max launches bsfa_cupy.block_max_scores three times instead (two warm-ups, then the one to profile).
--nq: fewer queries than keys (a chunk at the end of the cache, bottom-right), which "auto" may send to a
split-KV kernel; the sparse call then takes one scalar threshold keeping about rho of all gated tiles.
--clusters: sm90ws at head dim 128 launches its cluster entries (bsfa_fwd_mc, bsfa_fwd_dense_mc,
bsfa_block_max_mc; ncu -k regex:bsfa_) in place of the plain ones.
"""
import argparse

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--n", type=int, default=8192, help="keys (and queries, unless --nq)")
p.add_argument("--nq", type=int, default=None, help="queries (default: --n)")
p.add_argument("--d", type=int, default=128)
p.add_argument("--rho", type=float, default=0.25)
p.add_argument("--backend", choices=("auto", "sm80", "sm90", "sm90ws"), default="auto",
               help="kernel: sm80 (mma.sync), sm90 (wgmma), sm90ws (warp-specialised) or auto (default)")
p.add_argument("--hkv", type=int, default=8, help="K/V heads (32 query heads)")
p.add_argument("--block-max", action="store_true", help="profile block_max_scores instead of the forward")
p.add_argument("--clusters", action="store_true", help="sm90ws at head dim 128: the cluster entries")
args = p.parse_args()
if 32 % args.hkv:
    p.error(f"--hkv must divide the 32 query heads, got {args.hkv}")

import cupy as cp  # noqa: E402  (after argparse: --help works without a GPU)

import bsfa_cupy  # noqa: E402
from bsfa_cupy.tools.benchmark import thresholds_for_rho  # noqa: E402

if args.clusters:
    from bsfa_cupy import ops

    _real_get_module = ops.get_module
    ops.get_module = lambda key, *rest: _real_get_module(key, *rest).clustered() if key.arch == "sm90ws" else (
        _real_get_module(key, *rest))

rng = cp.random.default_rng(0)
nq = args.n if args.nq is None else args.nq
q = rng.standard_normal((1, nq, 32, args.d), dtype=cp.float32).astype(cp.float16)
k = rng.standard_normal((1, args.n, args.hkv, args.d), dtype=cp.float32).astype(cp.float16)
v = rng.standard_normal((1, args.n, args.hkv, args.d), dtype=cp.float32).astype(cp.float16)
if args.block_max:
    for _ in range(3):
        bsfa_cupy.block_max_scores(q, k, backend=args.backend)
else:
    tm = bsfa_cupy.block_max_scores(q, k, backend=args.backend)
    if nq == args.n:
        thr = bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm[0], args.rho, args.n))
    else:  # the gated tiles' (1 - rho) quantile, the diagonal ones counted too (a few per query tile)
        thr = float(cp.quantile(tm[cp.isfinite(tm)], 1 - args.rho))
    for _ in range(2):
        bsfa_cupy.attention(q, k, v, backend=args.backend)
    bsfa_cupy.attention(q, k, v, backend=args.backend)
    bsfa_cupy.attention(q, k, v, thr, backend=args.backend)
cp.cuda.Device().synchronize()
print("done")
