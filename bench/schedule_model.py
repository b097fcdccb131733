"""A model of the sm90ws persistent schedule's tile list (PersistentSchedule without kSplit, in
kernels_cu/bsfa_tile_scheduler_sm90.cuh): the sections, which tile each walker (a CTA, or a cluster of two)
takes round by round, each walker's work in key blocks, and how many heads the walkers of one round share.

Usage: python bench/schedule_model.py [--n 8192 16384 ...] [--hq 32] [--hkv 32] [--b 1] [--walkers 66] [--pairs]
e.g.   python bench/schedule_model.py --pairs --n 8192 16384 32768            (the tile-pair entry, Hq = Hkv = 32)
Per shape: the section width (heads), list slots (padding included), the busiest walker's blocks over the mean,
and the mean number of heads a round's walkers visit (fewer: each K/V block fetched from DRAM serves more of
them), for the 16-round rule alone and with the tile pairs' narrower sections (the kernel's rule since v37).
Work per tile: its key blocks (causal: query tile a of a head has a + 1 blocks of 128 keys; a pair, its longer
tile's) plus --overhead blocks. A model, not the device: it reads the same arithmetic, it does not run it.
"""
from __future__ import annotations

import argparse
import math
from typing import NamedTuple

SECTION_ROUNDS = 16


class ListShape(NamedTuple):
    width: int  # heads (b * Hq + h) a section
    span: int  # list slots a section, padding included
    slots: int  # list slots in all


def list_shape(nQ: int, BH: int, group: int, G: int, pair_tiles: bool, narrow: bool = True,
               any_list: bool = False) -> ListShape:
    """The constructor's arithmetic: nQ query tiles (pairs of them with pair_tiles), BH = B * Hq heads (or pairs of
    heads, for the head-pair and cluster entries' lists), group the list's group argument, G walkers. any_list:
    the narrower sections on every list, not only the tile pairs' (bench/variants/sections-narrow-all.diff)."""
    total, pair = nQ * BH, 2 * G
    width, span, slots = BH, total, total
    w = math.ceil(SECTION_ROUNDS * G / (nQ * group)) * group
    if w < BH and total <= 1 << 29:
        width, span = w, math.ceil(w * nQ / pair) * pair
        slots = math.ceil(BH / w) * span
    if (pair_tiles or any_list) and narrow and nQ >= 32 and total <= 1 << 29:
        lo = max(group, math.ceil(G / 16) // group * group)
        for v in range(lo, width, group):
            sp = math.ceil(v * nQ / pair) * pair
            sl = math.ceil(BH / v) * sp
            if (sl - total) * 32 <= total:
                width, span, slots = v, sp, sl
                break
    return ListShape(width, span, slots)


def tile(shape: ListShape, nQ: int, BH: int, j: int):
    """(rank, head) of list slot j, or None for a padding slot (the heaviest rank first where causal)."""
    sec = j // shape.span
    w0 = sec * shape.width
    w = min(shape.width, BH - w0)
    within = j - sec * shape.span
    if within >= w * nQ:
        return None
    rank = within // w
    return rank, w0 + within - rank * w


def walk(shape: ListShape, nQ: int, BH: int, G: int):
    """Per round, the (walker, rank, head) of every walker with a tile (boustrophedon: odd rounds reversed)."""
    for r in range(math.ceil(shape.slots / G)):
        taken = []
        for i in range(G):
            j = r * G + (G - 1 - i if r & 1 else i)
            t = tile(shape, nQ, BH, j) if j < shape.slots else None
            if t is not None:
                taken.append((i, *t))
        yield taken


def summary(nQ: int, BH: int, group: int, G: int, pair_tiles: bool, narrow: bool, causal: bool = True,
            overhead: float = 2.0, any_list: bool = False) -> dict:
    """Width, slots, busiest walker's work over the mean, and mean heads a round."""
    shape = list_shape(nQ, BH, group, G, pair_tiles, narrow, any_list)
    work = [0.0] * G
    heads = []
    for taken in walk(shape, nQ, BH, G):
        heads.append(len({h for _, _, h in taken}))
        for i, rank, _ in taken:
            a = nQ - 1 - rank if causal else rank
            blocks = (2 * a + 2 if pair_tiles else a + 1) if causal else (2 * nQ if pair_tiles else nQ)
            work[i] += blocks + overhead
    mean = sum(work) / G
    return dict(width=shape.width, slots=shape.slots, busiest=max(work) / mean, heads=sum(heads) / len(heads))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=32)
    ap.add_argument("--b", type=int, default=1)
    ap.add_argument("--walkers", type=int, default=66, help="CTAs, or clusters for the cluster entries (G)")
    ap.add_argument("--pairs", action="store_true", help="the tile-pair entry: clusters over pairs of query tiles")
    ap.add_argument("--heads", type=int, default=0,
                    help="heads (b * Hq) the list counts, and its group argument from --hq/--hkv as the entry passes "
                         "it: e.g. the head-pair entry's list counts B * Hq / 2 pairs with group Hq / Hkv")
    ap.add_argument("--any-list", action="store_true",
                    help="the narrower sections on every list (variants/sections-narrow-all), not only the tile pairs'")
    ap.add_argument("--noncausal", action="store_true")
    args = ap.parse_args(argv)
    if args.hq % args.hkv:
        ap.error(f"--hq must be a multiple of --hkv, got {args.hq} and {args.hkv}")
    group = args.hq // args.hkv
    BH = args.heads or args.b * args.hq
    narrowing = args.pairs or args.any_list
    print("| N | rule | width | slots | busiest / mean | heads a round |")
    print("|---|---|---|---|---|---|")
    for n in args.n:
        tiles = math.ceil(n / 128)
        nQ = math.ceil(tiles / 2) if args.pairs else tiles
        for narrow in (False, True) if narrowing else (False,):
            s = summary(nQ, BH, group, args.walkers, args.pairs, narrow, not args.noncausal, any_list=args.any_list)
            rule = "narrow" if narrow else "16 rounds"
            print(f"| {n} | {rule} | {s['width']} | {s['slots']} | {s['busiest']:.4f} | {s['heads']:.1f} |")


if __name__ == "__main__":
    main()
