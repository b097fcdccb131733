"""A model, not a measurement: what coupling query heads through one K/V ring costs a sparse call.

Usage: python bench/ring_coupling.py [--n 16384] [--rhos 0.5 0.25 0.1] [--heads 1 2 4] [--stages 3] [--trials 200]

Consumers that read the same K/V slots are held together by the ring: the producer refills a slot only once every
one of them released it, so no consumer starts block i before all have finished block i - stages. Today two heads
share a ring (bsfa_fwd_headpair: a warpgroup a head); a cluster of two head pairs sharing K and V by multicast would
couple four. Each head's blocks cost KEPT or SKIP (a kept block ~2.07x a skipped one, from the head-pair entry's
sparse times at 16K, NOTES v33), and each head keeps exactly ceil(rho * gated) of its gated blocks at random, as the
bar's thresholds do (two diagonal blocks always kept). Per causal query tile (128 rows, 64-key blocks), the tile's
time is its slowest head's finish; the loss is that over the mean head's own sum. The model ignores that the two
warpgroups of a CTA share its tensor cores (a lagging one then runs faster), so it overstates the in-CTA coupling:
a fourth stage, which it put at ~0.9 % at rho 0.5 for two heads, measured level on an H200 (NOTES v33).
"""
import argparse

import numpy as np

KEPT, SKIP = 2.07, 1.0


def tile_finish(cost, stages):
    """cost: (trials, heads, blocks) in visiting order; the slowest head's finish per trial."""
    trials, heads, blocks = cost.shape
    end = np.zeros_like(cost)
    for i in range(blocks):
        start = end[:, :, i - 1] if i else np.zeros((trials, heads))
        if i >= stages:
            start = np.maximum(start, end[:, :, i - stages].max(axis=1, keepdims=True))
        end[:, :, i] = start + cost[:, :, i]
    return end[:, :, -1].max(axis=1)


def random_costs(rng, trials, heads, blocks, rho):
    """Each head keeps ceil(rho * gated) of the gated blocks (all but the last two, the diagonal ones)."""
    gated = blocks - 2
    kept = rng.random((trials, heads, gated)).argsort(axis=-1) < int(np.ceil(rho * gated))
    cost = np.full((trials, heads, blocks), KEPT)
    cost[:, :, :gated] = np.where(kept, KEPT, SKIP)
    return cost


def coupling_loss(n, rho, heads, stages, trials, seed=0):
    """Summed over the causal query tiles of length n (every fourth, for time): slowest-head time over the mean head's
    own time, minus one."""
    rng = np.random.default_rng(seed)
    coupled = alone = 0.0
    for q in range(1, n // 128, 4):
        cost = random_costs(rng, trials, heads, 2 * (q + 1), rho)
        coupled += tile_finish(cost, stages).mean()
        alone += cost.sum(-1).mean()
    return coupled / alone - 1.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--stages", type=int, nargs="+", default=[3])
    p.add_argument("--trials", type=int, default=200)
    a = p.parse_args(argv)
    print("| rho | stages | " + " | ".join(f"loss, {h} head(s) a ring" for h in a.heads) + " |")
    print("|---|---|" + "---|" * len(a.heads))
    for rho in a.rhos:
        for s in a.stages:
            row = [coupling_loss(a.n, rho, h, s, a.trials) for h in a.heads]
            print(f"| {rho:g} | {s} | " + " | ".join(f"{round(100 * x, 2) + 0.0:.2f} %" for x in row) + " |")


if __name__ == "__main__":
    main()
