"""Quick check of both forward kernels against the float64 reference, before the full GPU suite.

Prints the worst output error of the wgmma (sm_90a) and mma.sync kernels per case; the two columns
should agree to rounding, so a layout or descriptor mistake in one kernel shows as one bad column.
Usage: python bench/diag_sm90.py [--only wgmma|mma.sync] [--first]
"""
import argparse

import cupy as cp
import ml_dtypes
import numpy as np

import bsfa_cupy
import bsfa_reference as ref
from bsfa_cupy import _kernels

p = argparse.ArgumentParser()
p.add_argument("--only", default=None, choices=["wgmma", "mma.sync"], help="run one kernel alone")
p.add_argument("--first", action="store_true", help="first case only")
args = p.parse_args()

builds = {"wgmma": True, "mma.sync": False}  # name: sm90
if args.only:
    builds = {args.only: builds[args.only]}
rng = np.random.default_rng(0)
print(f"{'case':44s}" + "".join(f"{b:>14s}" for b in builds))
for D in (64, 128):
    for dtype in ("float16", "bfloat16"):
        hd = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
        for causal in (True, False):
            for Nq, Nk in ((577, 641), (256, 256)):
                for mode in ("dense", "thr"):
                    q = rng.standard_normal((1, Nq, 4, D)).astype(hd)
                    k = rng.standard_normal((1, Nk, 2, D)).astype(hd)
                    v = rng.standard_normal((1, Nk, 2, D)).astype(hd)
                    thr = None
                    if mode == "thr":
                        tm = ref.block_max_scores(q, k, causal=causal)
                        thr = float(np.median(tm[np.isfinite(tm)]))
                    errs = []
                    for sm90 in builds.values():
                        with _kernels.tuning(sm90=sm90):
                            out, keep = bsfa_cupy.attention(*(cp.asarray(x) for x in (q, k, v)), thr, causal=causal,
                                                            return_keep=True)
                        want = ref.attention(q, k, v, causal=causal, keep=cp.asnumpy(keep))
                        got = cp.asnumpy(out).astype(np.float64)
                        nan = int(np.isnan(got).sum())
                        err = np.nanmax(np.abs(got - want))
                        errs.append(f"{err:9.2e}{'/nan' + str(nan) if nan else '':>5s}")
                    case = f"D={D} {dtype} causal={int(causal)} {Nq}x{Nk} {mode}"
                    print(f"{case:44s}" + "".join(f"{e:>14s}" for e in errs), flush=True)
                    if args.first:
                        raise SystemExit(0)
