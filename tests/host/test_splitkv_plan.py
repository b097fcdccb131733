"""The split-KV path's host logic, without a GPU: num_splits validation, packing, the split heuristic
and the routing of backend="auto"."""
from __future__ import annotations

import numpy as np
import pytest

import bsfa_cupy
from bsfa_cupy import _splitkv
from bsfa_cupy._splitkv import MAX_SPLITS, check_num_splits, heuristic_splits, pack_shape, plan, wanted

H200_SMS = 132


@pytest.mark.parametrize("good", [None, 1, 2, 64, MAX_SPLITS, np.int64(3)])
def test_num_splits_accepts_ints_and_none(good):
    assert check_num_splits(good) == (None if good is None else int(good))


@pytest.mark.parametrize("bad,exc,msg", [
    (0, ValueError, r"expected an int in \[1, 1024\] or None \(heuristic\), got 0"),
    (-3, ValueError, "got -3"),
    (MAX_SPLITS + 1, ValueError, f"got {MAX_SPLITS + 1}"),
    (2.0, TypeError, "expected an int >= 1 or None .*got float"),
    (True, TypeError, "got bool"),
    ("4", TypeError, "got str"),
])
def test_num_splits_rejects_bad_values(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        check_num_splits(bad)


def test_attention_checks_num_splits_before_touching_arrays():
    """Raised before any array is looked at (here not even GPU arrays)."""
    x = np.zeros((1, 1, 1, 64), np.float16)
    with pytest.raises(ValueError, match="num_splits: expected an int in"):
        bsfa_cupy.attention(x, x, x, num_splits=0)
    with pytest.raises(TypeError, match="num_splits: expected an int >= 1"):
        bsfa_cupy.attention(x, x, x, num_splits=1.5)
    for backend in ("sm80", "sm90"):
        with pytest.raises(ValueError, match=rf"num_splits: applies to the split-KV kernels .* got backend '{backend}'"):
            bsfa_cupy.attention(x, x, x, num_splits=2, backend=backend)


@pytest.mark.parametrize("Nq,G,rows,pack", [
    (1, 4, 16, 4), (1, 8, 16, 8), (1, 16, 16, 16), (3, 4, 16, 4), (4, 4, 16, 4), (16, 1, 16, 1), (8, 2, 16, 2),
    (5, 4, 64, 4), (1, 17, 64, 17), (3, 8, 64, 8),
    (16, 4, 64, 4), (16, 8, 64, 4), (3, 32, 64, 21), (1, 64, 64, 32), (64, 4, 64, 1),
    (65, 4, 128, 1), (100, 1, 128, 1), (128, 8, 128, 1), (129, 4, 128, 1), (1024, 4, 128, 1),
])
def test_pack_shape_keeps_a_heads_tile_rows_in_one_cta(Nq, G, rows, pack):
    assert pack_shape(Nq, G) == (rows, pack)
    assert pack * min(Nq, 128) <= rows
    if rows == 16:  # the key-split kernel only takes a whole group: K and V still read once per group
        assert pack == G


def test_heuristic_fills_the_gpu_and_keeps_splits_long():
    # decode, B=1, Hkv=8, one pack per K/V head: 8 CTAs of 64 rows, 2 resident per SM -> one full
    # wave, 264 // 8 = 33 splits; 16-row CTAs count one per SM -> 132 // 8 = 16
    assert heuristic_splits(8, 2048, H200_SMS) == 33
    assert heuristic_splits(8, 512, H200_SMS) == 33
    assert heuristic_splits(8, 2048, H200_SMS, rows=16) == 16
    assert heuristic_splits(8, 2048, H200_SMS, rows=16, gated=True) == 33  # thresholds: two per SM
    assert plan(1, 1, 131072, 32, 8, H200_SMS, gated=True).splits == 33
    assert heuristic_splits(8, 40, H200_SMS) == 10  # at most 40 // 4 splits (4 key tiles each)
    assert heuristic_splits(8, 3, H200_SMS) == 1
    # fewer than two splits per CTA fit a wave: the fewest splits filling the waves 85 % as well as the best
    assert heuristic_splits(70, 4096, H200_SMS, rows=128) == 3  # 210 CTAs: 1.59 waves, the best up to 4
    assert heuristic_splits(1000, 2048, H200_SMS) == 1  # the GPU is full already
    assert heuristic_splits(0, 10, H200_SMS) == 1
    assert heuristic_splits(32, 2048, H200_SMS, rows=128) == 4  # 128 CTAs, one resident per SM
    for ctas in range(1, 300):
        s = heuristic_splits(ctas, 4096, H200_SMS)
        assert 1 <= s <= MAX_SPLITS
        slots = 2 * H200_SMS
        # waves of 1/s the work each: never slower than the unsplit launch
        assert -(-ctas * s // slots) / s <= -(-ctas // slots)


def test_plan_and_grid():
    p = plan(1, 1, 131072, 32, 8, H200_SMS)  # decode: the 16-row key-split kernel, one CTA per SM
    assert (p.rows, p.pack, p.n_packs, p.splits) == (16, 4, 1, 16)
    assert p.grid(1, 8, 1) == (16, 8, 1)
    p = plan(1, 16, 131072, 32, 8, H200_SMS)
    assert (p.rows, p.pack, p.n_packs, p.splits) == (64, 4, 1, 33)
    assert p.grid(1, 8, 1) == (33, 8, 1)
    p = plan(1, 128, 131072, 32, 8, H200_SMS, num_splits=5)
    assert (p.rows, p.pack, p.n_packs, p.splits) == (128, 1, 4, 5)
    assert p.grid(1, 8, 1) == (5, 32, 1)


def test_ws_plan_and_grid():
    """The sm90ws split entry: one head per 128-row tile, a persistent grid of at most one CTA per SM."""
    p = plan(1, 128, 131072, 32, 8, H200_SMS, ws=True)  # 32 tiles: 4 splits fill 128 of 132 SMs
    assert (p.rows, p.pack, p.n_packs, p.splits, p.ws) == (128, 1, 4, 4, True)
    assert _splitkv.grid(p, 1, 128, 8) == (128, 1, 1)
    p = plan(1, 512, 131072, 32, 8, H200_SMS, ws=True)  # 128 tiles: one wave already
    assert (p.splits, p.grid(1, 8, 4)) == (1, (128, 1, 1))
    p = plan(2, 300, 4096, 8, 2, H200_SMS, num_splits=64, ws=True)  # 48 tiles x 64 splits: SMs wide
    assert (p.splits, p.grid(2, 2, 3)) == (64, (H200_SMS, 1, 1))
    with pytest.raises(ValueError, match="expected at most 2147483647 work tiles"):
        plan(4096, 2**20, 2**20, 64, 8, H200_SMS, num_splits=1024, ws=True)
    assert not plan(1, 128, 131072, 32, 8, H200_SMS).ws


@pytest.mark.parametrize("Nq,Hq,Hkv,pack", [
    (64, 32, 8, 2), (1, 32, 8, 2), (33, 16, 8, 2), (64, 24, 8, 1),  # G = 3: no pair in every group
    (65, 32, 8, 1), (64, 8, 8, 1),  # a head's rows past one warpgroup's 64; MHA
])
def test_ws_plan_packs_two_heads_of_a_group(Nq, Hq, Hkv, pack):
    """Nq <= 64 and an even GQA group: two query heads a 128-row tile (bsfa_fwd_split_pack)."""
    p = plan(1, Nq, 131072, Hq, Hkv, H200_SMS, ws=True)
    assert (p.pack, p.n_packs) == (pack, Hq // Hkv // pack)
    tiles = Hq // pack
    assert p.splits == heuristic_splits(tiles, 2048, H200_SMS, 128) and p.ws_width == min(H200_SMS, tiles * p.splits)


@pytest.mark.parametrize("Nq,Hq,Hkv,headpair,pack", [
    (65, 32, 8, True, 2), (128, 32, 8, True, 2), (700, 16, 8, True, 2),  # more than 64 rows, even groups
    (64, 32, 8, False, 2),  # up to 64 rows: the two-head tile of 64-row warpgroups (bsfa_fwd_split_pack)
    (128, 24, 8, False, 1), (128, 8, 8, False, 1),  # G = 3, MHA: no pairs
])
def test_ws_plan_takes_head_pairs(Nq, Hq, Hkv, headpair, pack):
    """head_pairs: more than 64 rows of an even group go to bsfa_fwd_split_headpair, two heads a CTA with 128
    rows each: half the tiles of one head a tile, so the split count is chosen for those."""
    p = plan(1, Nq, 131072, Hq, Hkv, H200_SMS, ws=True, head_pairs=True)
    assert (p.headpair, p.pack, p.n_packs) == (headpair, pack, Hq // Hkv // pack)
    tiles = Hq // pack * -(-Nq // 128)
    assert p.splits == heuristic_splits(tiles, 2048, H200_SMS, 128) and p.ws_width == min(H200_SMS, tiles * p.splits)
    assert not plan(1, Nq, 131072, Hq, Hkv, H200_SMS, ws=True).headpair  # only where asked for


@pytest.mark.parametrize("arch,Nq,G,hopper_ws,want", [
    ("auto", 1, 4, True, False), ("auto", 16, 4, True, False),  # a whole group in one mma.sync CTA
    ("auto", 17, 4, True, True), ("auto", 32, 2, True, True),  # two heads a wgmma tile
    ("auto", 32, 1, True, False), ("auto", 32, 3, True, False),  # no pairs: the mma.sync family packs better
    ("auto", 33, 1, True, True), ("auto", 64, 3, True, True), ("auto", 128, 4, True, True),
    ("auto", 700, 4, True, True),
    ("auto", 128, 4, False, False),  # no Hopper, or no tensor maps
    ("sm90ws", 1, 1, True, True), ("splitkv", 128, 4, True, False),
])
def test_ws_routing(arch, Nq, G, hopper_ws, want):
    assert _splitkv.ws_wanted(arch, Nq, G, hopper_ws) is want


@pytest.mark.parametrize("arch,num_splits,B,Nq,Nk,Hq,D,want", [
    ("auto", None, 1, 1, 131072, 32, 128, True),  # decode
    ("auto", None, 1, 16, 131072, 32, 128, True),  # short chunk
    ("auto", None, 1, 128, 131072, 32, 128, True),  # 32 query tiles on 132 SMs
    ("auto", None, 64, 1, 8192, 32, 128, True),  # batched decode: packing still pays
    ("auto", None, 1, 1024, 131072, 32, 128, False),  # 256 query tiles: a full GPU
    ("auto", None, 1, 4096, 4096, 32, 128, False),  # prefill (the benchmark sweep's smallest)
    ("auto", None, 1, 1, 1024, 32, 128, False),  # short keys: not worth a second launch
    ("auto", None, 1, 1, 131072, 32, 96, False),  # no split-KV kernel at head dim 96
    ("sm90ws", None, 1, 1, 131072, 32, 128, False),
    ("sm90ws", 3, 1, 4096, 4096, 32, 128, True),  # its own split entry
    ("splitkv", None, 1, 4096, 4096, 32, 128, True),
    ("auto", 4, 1, 4096, 4096, 32, 128, True),
])
def test_routing(arch, num_splits, B, Nq, Nk, Hq, D, want):
    assert wanted(arch, num_splits, B, Nq, Nk, Hq, D, H200_SMS) is want


def test_routing_constants_documented():
    doc = bsfa_cupy.attention.__doc__
    assert "num_splits" in doc and "Split-KV" in doc and "Calibration and decode" in doc
    assert str(_splitkv.MIN_AUTO_NK) in doc and str(_splitkv.PACK_NQ) in doc
