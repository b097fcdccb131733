"""Do the two warpgroups of a head pair hold each other back where their decisions differ?

Usage: python bench/pair_coupling.py [--n 16384] [--rhos 1 0.5 0.25] [--rounds 3]

bsfa_fwd_headpair runs two query heads of a GQA group a CTA, one a consumer warpgroup, both reading the same K/V
ring. The same call (B=1, Hq=32, Hkv=8, D=128, float16, causal, the library's routing) is timed with random query
heads ("independent": the two warpgroups keep different blocks) and with the second head of each pair a copy of
the first ("pair-copies": the same S, the same decisions). Thresholds keep the top ceil(rho * gated) tiles of
each head and query tile, as the bar's sweep does, so both have the same realised rho and the same work; a gap
between them is the cost of the warpgroups' different paths through the ring. Timed as `bsfa bench` times
(bsfa_cupy.tools.benchmark.Timer): --rounds interleaved batches of 20 calls, each after at least 300 ms of
untimed calls of its own; prints the medians.
"""
import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--rhos", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds: expected at least 1, got {args.rounds}")

    import cupy as cp
    import torch

    import bsfa_cupy
    from bsfa_cupy.tools.benchmark import Timer, realised_rho, thresholds_for_rho

    n, hq, hkv, d = args.n, 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.float16)
    q_copies = q.clone()
    q_copies[:, :, 1::2] = q[:, :, 0::2]  # the pairs are heads (2j, 2j+1) of each GQA group

    timer = Timer(args.rounds, 20, warmup_ms=300.0)
    for rho in args.rhos:
        cases = {}
        for name, qq in (("independent", q), ("pair-copies", q_copies)):
            tile_max = cp.from_dlpack(bsfa_cupy.block_max_scores(qq, k))[0]
            thr = bsfa_cupy.DeviceThresholds(thresholds_for_rho(tile_max, rho, n))
            _, keep = bsfa_cupy.attention(qq, k, v, thr, return_keep=True)
            keep = cp.from_dlpack(keep)
            agree = float((keep[0, 0::2] == keep[0, 1::2]).mean())
            print(f"rho {rho} {name:12s}: realised rho {realised_rho(keep, n):.4f}, pair keep agreement {agree:.3f}")
            cases[name] = lambda i, qq=qq, thr=thr: bsfa_cupy.attention(qq, k, v, thr)
        ms = timer.many(cases, 1)
        for got in ms.values():
            if isinstance(got, BaseException):
                raise got
        a, b = ms["independent"], ms["pair-copies"]
        print(f"rho {rho}: independent {a:.3f} ms, pair copies {b:.3f} ms, independent / copies {a / b:.4f}", flush=True)


if __name__ == "__main__":
    main()
