"""Quick check of both forward kernels against the float64 reference, before the full GPU suite.

Prints the worst output error of the wgmma (backend "sm90", Hopper only) and mma.sync ("sm80") kernels
per case; the two columns should agree to rounding, so a layout or descriptor mistake in one kernel
shows as one bad column.
Usage: python bench/diag_sm90.py [--only sm90|sm80] [--first]
"""
import argparse

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--only", default=None, choices=["sm90", "sm80"], help="run one kernel alone")
p.add_argument("--first", action="store_true", help="first case only")
args = p.parse_args()

import cupy as cp  # noqa: E402  (after argparse: --help works without a GPU)
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import bsfa_cupy  # noqa: E402
import bsfa_reference as ref  # noqa: E402

builds = {"sm90 (wgmma)": "sm90", "sm80 (mma.sync)": "sm80"}  # column: backend
if args.only:
    builds = {name: b for name, b in builds.items() if b == args.only}
elif str(cp.cuda.Device().compute_capability) != "90":
    builds = {name: b for name, b in builds.items() if b != "sm90"}
    print("not compute capability 9.0: the sm80 kernel alone")
rng = np.random.default_rng(0)
print(f"{'case':44s}" + "".join(f"{b:>18s}" for b in builds))
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
                    for backend in builds.values():
                        out, keep = bsfa_cupy.attention(*(cp.asarray(x) for x in (q, k, v)), thr, causal=causal,
                                                        return_keep=True, backend=backend)
                        want = ref.attention(q, k, v, causal=causal, keep=cp.asnumpy(keep))
                        got = cp.asnumpy(out).astype(np.float64)
                        nan = int(np.isnan(got).sum())
                        err = np.nanmax(np.abs(got - want))
                        errs.append(f"{err:9.2e}{'/nan' + str(nan) if nan else '':>5s}")
                    case = f"D={D} {dtype} causal={int(causal)} {Nq}x{Nk} {mode}"
                    print(f"{case:44s}" + "".join(f"{e:>18s}" for e in errs), flush=True)
                    if args.first:
                        raise SystemExit(0)
