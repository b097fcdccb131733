"""The sm90ws cluster entries (bsfa_fwd_mc, bsfa_fwd_dense_mc, bsfa_block_max_mc): two CTAs of a cluster
take two query heads of one GQA group and share every K and V load by TMA multicast. bsfa_fwd_dense_pair
takes two neighbouring query tiles of one head instead (any group) and must equal bsfa_fwd_dense bitwise. Each CTA runs the
consumers of the plain entries on the same key blocks in the same order, so their results must equal the
plain entries' bitwise -- out, lse, keep and the tile maxima -- over dtypes, causal or not, odd lengths,
GQA groups of 2 and 4, MQA and batches. ``attention`` routes dense calls of even GQA groups to the dense
one, and dense calls of odd groups from 4K rows to the tile-pair entry; these tests swap the entries in for
the plain ones, and keep the plain ones from the cluster entries for the comparison.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.gpu.conftest import _is_hopper
from tests.support.gpu import assert_bitwise, cp, random_inputs, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]

CLUSTER_OF = {"fwd": "fwd_mc", "fwd_dense": "fwd_dense_mc", "block_max": "block_max_mc"}


def _use_clusters(monkeypatch, on: list, seen: list):
    """While ``on[0]``, sm90ws modules come back with their cluster entries in the plain entries' places;
    every launch of a cluster entry is recorded in ``seen``."""
    import bsfa_cupy
    from bsfa_cupy import ops

    real = ops.get_module
    swapped, plain_only = {}, {}

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch != "sm90ws":
            return mod
        if not on[0]:  # the plain entries only: dense calls would take the cluster entry through forward()
            if key not in plain_only:
                plain_only[key] = dataclasses.replace(mod, dense_clusters=False, headpairs=False)
            return plain_only[key]
        if key not in swapped:
            clustered = mod.clustered()
            assert clustered is not mod, f"{key.name()}: no cluster entries"
            kerns = {}
            for plain, mc in CLUSTER_OF.items():
                kern = getattr(clustered, plain)
                assert kern.cluster == 2, f"{key.name()}: {plain} of clustered() is no cluster entry"
                kern.grid(1, 2, 1)  # the occupancy query needs the real function: asked before the spy wraps it

                def spy(*args, _fn=kern.fn, _name=mc, **kw):
                    seen.append(_name)
                    return _fn(*args, **kw)

                kerns[plain] = dataclasses.replace(kern, fn=spy)
            # forward() takes them as they are (calls with thresholds too: not bsfa_fwd_headpair)
            swapped[key] = dataclasses.replace(mod, **kerns, dense_clusters=False, headpairs=False)
        return swapped[key]

    monkeypatch.setattr(ops, "get_module", get_module)
    bsfa_cupy.clear_plan_cache()


def _calls(q, k, v, causal):
    """(block maxima, dense out/lse/keep, gated out/lse/keep) with thresholds at the tile maxima's median."""
    import bsfa_cupy

    tm = cp.from_dlpack(bsfa_cupy.block_max_scores(q, k, causal=causal, backend="sm90ws"))
    finite = tm[cp.isfinite(tm)]
    thr = float(cp.median(finite)) if finite.size else 0.0
    dense = bsfa_cupy.attention(q, k, v, causal=causal, return_lse=True, return_keep=True, backend="sm90ws")
    gated = bsfa_cupy.attention(q, k, v, thr, causal=causal, return_lse=True, return_keep=True, backend="sm90ws")
    return (tm, *dense, *gated)


def _assert_bitwise(plain, mc):
    names = ("tile_max", "dense out", "dense lse", "dense keep", "gated out", "gated lse", "gated keep")
    assert_bitwise(names, plain, mc, "the cluster entry")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 8, 2), (1, 577, 577, 4, 2), (3, 300, 2100, 4, 1),
                                   (1, 2100, 300, 16, 8)], ids=lambda s: "x".join(map(str, s)))
def test_cluster_entries_equal_plain(monkeypatch, dtype, causal, shape):
    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 7 + Nk + Hq)
    q, k, v = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, 128, dtype))
    on, seen = [False], []
    _use_clusters(monkeypatch, on, seen)
    plain = _calls(q, k, v, causal)
    assert seen == []
    on[0] = True
    import bsfa_cupy

    bsfa_cupy.clear_plan_cache()
    mc = _calls(q, k, v, causal)
    assert seen == ["block_max_mc", "fwd_dense_mc", "fwd_mc"], f"expected the three cluster entries, got {seen}"
    _assert_bitwise(plain, mc)


def _use_tile_pairs(monkeypatch, on: list, seen: list):
    """While ``on[0]``, dense calls of sm90ws modules launch bsfa_fwd_dense_pair (recorded in ``seen``);
    otherwise the plain bsfa_fwd_dense, whatever the GQA group."""
    import bsfa_cupy
    from bsfa_cupy import ops

    real = ops.get_module
    modules = {}

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch != "sm90ws":
            return mod
        if (key, on[0]) not in modules:
            m = mod.tile_pairs() if on[0] else dataclasses.replace(mod, dense_clusters=False)
            if on[0]:
                kern = m.fwd_dense
                assert kern.pair_tiles, f"{key.name()}: no tile-pair entry"
                kern.grid(1, 2, 1)  # the occupancy query needs the real function: asked before the spy wraps it

                def spy(*args, _fn=kern.fn, **kw):
                    seen.append("fwd_dense_pair")
                    return _fn(*args, **kw)

                m = dataclasses.replace(m, fwd_dense=dataclasses.replace(kern, fn=spy))
            modules[(key, on[0])] = m
        return modules[(key, on[0])]

    monkeypatch.setattr(ops, "get_module", get_module)
    bsfa_cupy.clear_plan_cache()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 1100, 1300, 4, 4), (1, 577, 577, 3, 1), (3, 300, 2100, 2, 2),
                                   (1, 2100, 300, 6, 2), (2, 1024, 1536, 2, 1), (1, 100, 100, 1, 1),
                                   (2, 8192, 8192, 8, 8), (1, 8200, 8192, 24, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_tile_pair_entry_equals_plain_dense(monkeypatch, dtype, causal, shape):
    """bsfa_fwd_dense_pair (two neighbouring query tiles of one head a cluster) against bsfa_fwd_dense: out,
    lse and keep bitwise, over MHA and odd GQA groups, odd tile counts (the last CTA of a cluster without a
    tile), Nq < Nk and Nq > Nk (bottom-right causal: tiles without keys beside tiles with), a single tile,
    and lists of 32 pairs a head and more cut into sections narrower than the 16-round rule's (on a grid of
    66 clusters: 16 heads in sections of 8; 24 heads, groups of 3, in sections of 12)."""
    import bsfa_cupy

    B, Nq, Nk, Hq, Hkv = shape
    rng = np.random.default_rng(Nq * 5 + Nk + Hq)
    q, k, v = map(cp.asarray, random_inputs(rng, B, Nq, Nk, Hq, Hkv, 128, dtype))
    on, seen = [False], []
    _use_tile_pairs(monkeypatch, on, seen)
    runs = []
    for pair in (False, True):
        on[0] = pair
        bsfa_cupy.clear_plan_cache()
        runs.append(bsfa_cupy.attention(q, k, v, causal=causal, return_lse=True, return_keep=True, backend="sm90ws"))
    assert seen == ["fwd_dense_pair"], f"expected one launch of the tile-pair entry, got {seen}"
    assert_bitwise(("out", "lse", "keep"), runs[0], runs[1], "the tile-pair entry")


def test_cluster_entries_exist_at_head_dim_128_only():
    from bsfa_cupy import _kernels
    from bsfa_cupy._variants import Backend, VariantKey

    dev = cp.cuda.Device().id
    for D in (64, 128):
        mod = _kernels.get_module(VariantKey("float16", D, True, "sm90ws"), Backend("sm90ws"), dev)
        mc = mod.clustered()
        assert all(k.cluster == 1 for k in (mod.fwd, mod.fwd_dense, mod.block_max))  # the modules calls run
        if D == 128:
            assert all(k.cluster == 2 for k in (mc.fwd, mc.fwd_dense, mc.block_max))
            assert mc.fwd_varlen is mod.fwd_varlen and mc.fwd_split is mod.fwd_split  # no cluster form
            assert mc.fwd_dense_pair.cluster == 2 and mc.fwd_dense_pair.pair_tiles and mod.fwd_dense_pair is None
            assert mod.clustered() is mc  # loaded once
            grid = mc.fwd.grid(1, 32, 128)  # asks the driver how many clusters fit at once
            assert 1 <= mc.fwd.cluster_slots <= mc.fwd.sms // 2, mc.fwd.cluster_slots
            assert grid == (2 * mc.fwd.cluster_slots, 1, 1), grid
        else:
            assert mc is mod


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(1, 1), (3, 1)])
def test_long_calls_of_odd_groups_take_the_tile_pair_entry(monkeypatch, Hq, Hkv, causal):
    """``attention`` routes a dense call of an odd GQA group with PAIR_MIN_Q_TILES query tiles, causal or not,
    to bsfa_fwd_dense_pair by itself (no swapped module): the launch is seen, and out and lse equal the plain
    dense entry's bitwise."""
    import bsfa_cupy
    from bsfa_cupy import _kernels, ops

    N = _kernels.PAIR_MIN_Q_TILES * 128
    rng = np.random.default_rng(N + Hq)
    q, k, v = map(cp.asarray, random_inputs(rng, 1, N, N, Hq, Hkv, 128, "float16"))
    real, seen, plain_mode = ops.get_module, [], [False]
    cache = {}

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch != "sm90ws":
            return mod
        if (key, plain_mode[0]) not in cache:
            if plain_mode[0]:
                cache[(key, True)] = dataclasses.replace(mod, dense_clusters=False)
            else:
                pair = mod.clustered().fwd_dense_pair
                pair.grid(1, 1, 2)  # the occupancy query needs the real function: asked before the spy wraps it

                def spy(*args, _fn=pair.fn, **kw):
                    seen.append("fwd_dense_pair")
                    return _fn(*args, **kw)

                spied = dataclasses.replace(mod.clustered(), fwd_dense_pair=dataclasses.replace(pair, fn=spy))
                cache[(key, False)] = dataclasses.replace(mod, _clustered=spied)
        return cache[(key, plain_mode[0])]

    monkeypatch.setattr(ops, "get_module", get_module)
    runs = []
    for plain in (False, True):
        plain_mode[0] = plain
        bsfa_cupy.clear_plan_cache()
        runs.append(bsfa_cupy.attention(q, k, v, causal=causal, return_lse=True, backend="sm90ws"))
    assert seen == ["fwd_dense_pair"], f"expected one launch of the tile-pair entry, got {seen}"
    assert_bitwise(("out", "lse"), runs[1], runs[0], "the routed tile-pair call (against the plain dense entry)")
