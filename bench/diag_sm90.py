"""Quick check of the wgmma forward against the float64 reference, before the full GPU suite.

Prints the worst output error of the wgmma and mma.sync kernels per case (and, with --swap, of the
diagnostic BSFA_V_DESC_SWAP build), so a layout or descriptor mistake shows as one bad column.
"""
import argparse

import cupy as cp
import numpy as np

import bsfa_cupy
import bsfa_reference as ref
from bsfa_cupy import _kernels

p = argparse.ArgumentParser()
p.add_argument("--swap", action="store_true")
p.add_argument("--only", default=None, help="build name to run alone")
p.add_argument("--first", action="store_true", help="first case only")
args = p.parse_args()

orig = _kernels.VariantKey.options
builds = {"wgmma": (True, 0), "mma.sync": (False, 0)}  # name: (sm90, V descriptor swap)
if args.swap:
    builds["wgmma-swap"] = (True, 1)
if args.only:
    builds = {args.only: builds[args.only]}
rng = np.random.default_rng(0)
print(f"{'case':44s}" + "".join(f"{b:>14s}" for b in builds))
for D in (64, 128):
    for dtype in ("float16", "bfloat16"):
        for causal in (True, False):
            for Nq, Nk in ((577, 641), (256, 256)):
                for mode in ("dense", "thr"):
                    host = ref.__dict__  # noqa
                    import ml_dtypes
                    hd = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
                    q = rng.standard_normal((1, Nq, 4, D)).astype(hd)
                    k = rng.standard_normal((1, Nk, 2, D)).astype(hd)
                    v = rng.standard_normal((1, Nk, 2, D)).astype(hd)
                    thr = None
                    if mode == "thr":
                        tm = ref.block_max_scores(q, k, causal=causal)
                        thr = float(np.median(tm[np.isfinite(tm)]))
                    errs = []
                    for name, (sm90, swap) in builds.items():
                        _kernels.VariantKey.options = (
                            lambda self, swap=swap: orig(self) + ((f"-DBSFA_V_DESC_SWAP={swap}",) if self.sm90 else ()))
                        _kernels.get_module.cache_clear()
                        with _kernels.tuning(sm90=sm90):
                            out, keep = bsfa_cupy.attention(*(cp.asarray(x) for x in (q, k, v)), thr, causal=causal,
                                                            return_keep=True)
                        want = ref.attention(q, k, v, causal=causal, keep=cp.asnumpy(keep))
                        err = np.nanmax(np.abs(cp.asnumpy(out).astype(np.float64) - want))
                        nan = int(np.isnan(cp.asnumpy(out).astype(np.float32)).sum())
                        errs.append(f"{err:9.2e}{'/nan' + str(nan) if nan else '':>5s}")
                    case = f"D={D} {dtype} causal={int(causal)} {Nq}x{Nk} {mode}"
                    print(f"{case:44s}" + "".join(f"{e:>14s}" for e in errs), flush=True)
                    if args.first:
                        raise SystemExit(0)
_kernels.VariantKey.options = orig
