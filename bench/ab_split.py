"""A/B of the sm90ws split entries for calls with thresholds: bsfa_fwd_split_headpair (routed for even GQA
groups and more than 64 rows), bsfa_fwd_split_lag (Module.head_pairs(False)) and bsfa_fwd_split
(Module.unlagged()), with the dense call beside them, on chunks against a long cache.

Usage: python bench/ab_split.py [--nq 128 256 512] [--nk 131072] [--rhos 0.25 0.1]
B=1, Hq=32, Hkv=8, D=128, float16, bottom-right causal; thresholds per head and query tile keeping about rho of
the gated tiles (bench/decode.py's rule). Each variant is an AttentionPlan built once (a plan keeps its kernel
handles), timed with bsfa_cupy.tools.benchmark.Timer (9 interleaved repeats of 3 calls, median, each batch after
at least 100 ms of untimed calls of its own); the lag and
unlagged plans' outputs are compared bitwise, the head-pair plan's with theirs by the largest difference (its
64-key blocks round differently).
"""
import argparse
import sys
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--nq", type=int, nargs="+", default=[128, 256, 512])
p.add_argument("--nk", type=int, default=131072)
p.add_argument("--rhos", type=float, nargs="+", default=[0.25, 0.1])
args = p.parse_args()

import cupy as cp  # noqa: E402  (after argparse: --help works without a GPU)
import torch  # noqa: E402

import bsfa_cupy  # noqa: E402
from bsfa_cupy import ops  # noqa: E402
from bsfa_cupy.tools.benchmark import Timer, _warm_up_clocks  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from decode import thresholds_for_rho  # noqa: E402

real_get_module = ops.get_module
variant = [None]  # None: the routed module; else a function of it that gives the variant
ops.get_module = lambda key, *rest: (variant[0](real_get_module(key, *rest))
                                     if variant[0] and key.arch == "sm90ws" else real_get_module(key, *rest))


def outputs(x):
    return (x,) if torch.is_tensor(x) else tuple(x)


timer = Timer(9, 3)
_warm_up_clocks()
for nq in args.nq:
    q = torch.randn(1, nq, 32, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(1, args.nk, 8, 128, device="cuda", dtype=torch.float16)
    v = torch.randn(1, args.nk, 8, 128, device="cuda", dtype=torch.float16)
    tm = cp.from_dlpack(bsfa_cupy.block_max_scores(q, k))
    for rho in args.rhos:
        thr = bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm[0], rho, nq, args.nk, xp=cp))
        plans = {}
        for name, var, t in (("dense", None, None), ("headpair", None, thr),
                             ("lag", lambda mod: mod.head_pairs(False), thr),
                             ("unlagged", lambda mod: mod.unlagged(), thr)):
            variant[0] = var
            bsfa_cupy.clear_plan_cache()
            plans[name] = bsfa_cupy.AttentionPlan(q, k, v, t)
        variant[0] = None
        lag, unl, hp = (outputs(plans[n].run(q, k, v)) for n in ("lag", "unlagged", "headpair"))
        same = all(bool(torch.equal(a, b)) for a, b in zip(lag, unl))
        diff = float((hp[0].float() - lag[0].float()).abs().max())
        ms = timer.many({n: (lambda i, pl=pl: pl.run(q, k, v)) for n, pl in plans.items()}, 1)
        print(f"{nq}x{args.nk} rho={rho}: dense {ms['dense']:.4f} ms | headpair {ms['headpair']:.4f} "
              f"({ms['dense'] / ms['headpair']:.2f}x dense) | lag {ms['lag']:.4f} "
              f"({ms['dense'] / ms['lag']:.2f}x dense) | unlagged {ms['unlagged']:.4f} "
              f"({ms['dense'] / ms['unlagged']:.2f}x dense) | lag = unlagged bitwise: {same} | "
              f"max|headpair - lag| {diff:.2e}", flush=True)
