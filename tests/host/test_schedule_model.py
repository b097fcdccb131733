"""bench/schedule_model.py, the model of the sm90ws persistent tile list: every tile once, sections of whole GQA
groups, and the tile pairs' narrower sections where the 16-round rule leaves one section of all heads."""
from __future__ import annotations

import pytest

from tests.support.bench_scripts import load_bench_script


@pytest.mark.parametrize("nQ,BH,group,G,pairs", [(32, 32, 1, 66, True), (33, 24, 3, 66, True), (64, 16, 4, 132, False),
                                                 (16, 64, 1, 64, True), (40, 48, 3, 60, True), (7, 5, 1, 66, True)])
@pytest.mark.parametrize("narrow,any_list", [(False, False), (True, False), (True, True)])
def test_every_tile_is_walked_once(nQ, BH, group, G, pairs, narrow, any_list):
    model = load_bench_script("schedule_model")
    shape = model.list_shape(nQ, BH, group, G, pairs, narrow, any_list)
    seen = [(rank, h) for taken in model.walk(shape, nQ, BH, G) for _, rank, h in taken]
    assert len(seen) == len(set(seen)) == nQ * BH, \
        f"{len(seen)} tiles walked, {len(set(seen))} distinct, expected {nQ * BH}"
    assert shape.width % group == 0 or shape.width == BH, f"a section of {shape.width} heads splits a group of {group}"
    assert shape.slots % (2 * G) == 0 or shape.width == BH, f"{shape.slots} slots: not whole round pairs of {G}"


def test_tile_pairs_at_8k_take_sections_of_eight_heads():
    model = load_bench_script("schedule_model")
    old = model.summary(32, 32, 1, 66, pair_tiles=True, narrow=False)
    new = model.summary(32, 32, 1, 66, pair_tiles=True, narrow=True)
    assert (old["width"], new["width"]) == (32, 8), (old, new)
    assert new["heads"] == pytest.approx(8.0) and old["heads"] == pytest.approx(32.0), (old, new)
    assert new["busiest"] <= 1.005, f"busiest walker at {new['busiest']:.4f} of the mean"


@pytest.mark.parametrize("nQ", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("G", [64, 66])
def test_narrow_sections_keep_the_walkers_balanced(nQ, G):
    model = load_bench_script("schedule_model")
    old = model.summary(nQ, 32, 1, G, pair_tiles=True, narrow=False)
    new = model.summary(nQ, 32, 1, G, pair_tiles=True, narrow=True)
    assert new["busiest"] <= max(old["busiest"], 1.005), (nQ, G, old, new)
    assert new["width"] <= old["width"], (old, new)


def test_short_lists_keep_the_16_round_rule():
    model = load_bench_script("schedule_model")
    assert model.list_shape(16, 32, 1, 66, True) == model.list_shape(16, 32, 1, 66, True, narrow=False)


def test_any_list_narrows_the_head_pairs_list_at_16k():
    model = load_bench_script("schedule_model")
    # bsfa_fwd_headpair at 16K, Hq = 32, Hkv = 8: 128 tiles, 16 pairs of heads, group argument 4, 132 CTAs
    assert model.list_shape(128, 16, 4, 132, False, any_list=False).width == 16
    s = model.summary(128, 16, 4, 132, pair_tiles=False, narrow=True, any_list=True)
    assert s["width"] == 8 and s["busiest"] <= 1.005, s
