"""Time builds of the sm_90a forward with extra compile-time macros, side by side in one process.

Usage: python bench/sm90_macros.py NAME=[MACRO=VALUE[,MACRO=VALUE]] ... [--n 16384] [--rhos 0.5 0.1]
           [--thresholds handle|array|both]
e.g.   python bench/sm90_macros.py base= other=BSFA_SOME_MACRO=1 --n 16384
Prints dense and sparse times per build and the ratio to the first build's dense (D=128, Hkv=8,
float16, causal). Sparse calls pass a DeviceThresholds (validated once; "handle") and/or the
plain device array ("array": a NaN check with a stream wait per call).
"""
import argparse

import cupy as cp

import bsfa_cupy
from bsfa_cupy import _kernels
from bsfa_cupy.tools.benchmark import Timer, _input_sets, dense_flops, realised_rho, thresholds_for_rho

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=16384)
p.add_argument("--d", type=int, default=128)
p.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.1])
p.add_argument("--thresholds", choices=["handle", "array", "both"], default="handle")
p.add_argument("builds", nargs="+")
args = p.parse_args()

builds = {}
for spec in args.builds:
    name, _, macros = spec.partition("=")
    builds[name] = tuple(f"-D{m}" for m in macros.split(",") if m)

orig = _kernels.VariantKey.options
timer = Timer(repeats=7, inner=4)
sets = _input_sets(1, args.n, 32, 8, args.d, "float16", 60 * 2**20)
tmax = [cp.from_dlpack(bsfa_cupy.block_max_scores(q, k))[0] for q, k, _ in sets]
thr = {rho: [thresholds_for_rho(t, rho, args.n) for t in tmax] for rho in args.rhos}
paths = ["handle", "array"] if args.thresholds == "both" else [args.thresholds]
as_passed = {"array": lambda t: t, "handle": bsfa_cupy.DeviceThresholds}
flops = dense_flops(1, 32, args.n, args.d, True)
base = None
for name, extra in builds.items():
    _kernels.VariantKey.options = lambda self, extra=extra: orig(self) + (extra if self.sm90 else ())
    _kernels.get_module.cache_clear()
    with _kernels.tuning(sm90=True):
        dense = timer(lambda i: bsfa_cupy.attention(*sets[i]), len(sets))
        base = base or dense
        line = f"{name:14s} dense {dense:.3f} ms {flops / dense / 1e9:.0f} TFLOP/s ({dense / base:.3f} of first)"
        for rho in args.rhos:
            _, keep = bsfa_cupy.attention(*sets[0], thr[rho][0], return_keep=True)
            got = realised_rho(cp.from_dlpack(keep), args.n)
            line += f" | rho={got:.2f}"
            for path in paths:
                t = [as_passed[path](x) for x in thr[rho]]
                ms = timer(lambda i: bsfa_cupy.attention(*sets[i], t[i]), len(sets))
                line += f" {path} {ms:.3f} ms {ms / dense:.3f}"
        print(line, flush=True)
_kernels.VariantKey.options = orig
