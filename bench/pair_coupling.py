"""Do the two warpgroups of a head pair hold each other back where their decisions differ?

Usage: python bench/pair_coupling.py [--n 16384] [--rhos 1 0.5 0.25] [--rounds 3]

bsfa_fwd_headpair runs two query heads of a GQA group a CTA, one a consumer warpgroup, both reading the same K/V
ring. The same call (B=1, Hq=32, Hkv=8, D=128, float16, causal, the library's routing) is timed with random query
heads ("independent": the two warpgroups keep different blocks) and with the second head of each pair a copy of
the first ("pair-copies": the same S, the same decisions). Thresholds keep the top ceil(rho * gated) tiles of
each head and query tile, as the bar's sweep does, so both have the same realised rho and the same work; a gap
between them is the cost of the warpgroups' different paths through the ring. Rounds interleave the two, each
20 calls after 300 ms of warm-up; prints each and the medians.
"""
import argparse
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--rhos", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import cupy as cp
    import torch

    import bsfa_cupy
    from bsfa_cupy.tools.benchmark import realised_rho, thresholds_for_rho

    n, hq, hkv, d = args.n, 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.float16)
    q_copies = q.clone()
    q_copies[:, :, 1::2] = q[:, :, 0::2]  # the pairs are heads (2j, 2j+1) of each GQA group

    def timed(fn, warm_ms=300, calls=20):
        end = time.perf_counter() + warm_ms / 1e3
        while time.perf_counter() < end:
            fn()
            torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(calls):
            fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / calls

    times = {}
    for rho in args.rhos:
        cases = {}
        for name, qq in (("independent", q), ("pair-copies", q_copies)):
            tile_max = cp.from_dlpack(bsfa_cupy.block_max_scores(qq, k))[0]
            thr = bsfa_cupy.DeviceThresholds(thresholds_for_rho(tile_max, rho, n))
            _, keep = bsfa_cupy.attention(qq, k, v, thr, return_keep=True)
            keep = cp.from_dlpack(keep)
            agree = float((keep[0, 0::2] == keep[0, 1::2]).mean())
            cases[name] = (qq, thr, realised_rho(keep, n), agree)
        for rnd in range(args.rounds):
            for name, (qq, thr, got, agree) in cases.items():
                ms = timed(lambda: bsfa_cupy.attention(qq, k, v, thr))
                times.setdefault((rho, name), []).append(ms)
                print(f"rho {rho} {name:12s} round {rnd}: {ms:.3f} ms (realised rho {got:.4f}, "
                      f"pair keep agreement {agree:.3f})", flush=True)
    print()
    for rho in args.rhos:
        a, b = np.median(times[(rho, "independent")]), np.median(times[(rho, "pair-copies")])
        print(f"rho {rho}: independent {a:.3f} ms, pair copies {b:.3f} ms, independent / copies {a / b:.4f}")


if __name__ == "__main__":
    main()
