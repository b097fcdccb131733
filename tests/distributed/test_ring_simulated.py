"""The ring's arithmetic in one process: every "rank" attends to every shard in ring order with the
per-step code the distributed driver runs, and the unsharded result is the whole-sequence call."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bsfa_reference as R  # noqa: E402
from bsfa_cupy._ring_step import RankAttention, fully_masked, merge_into, reference_call  # noqa: E402
from bsfa_cupy._sequence_layout import spans  # noqa: E402
from bsfa_cupy.distributed import shard, unshard  # noqa: E402
from tests.distributed.support import (ATOL32, ATOL64, RTOL32, RTOL64, problem, scalar_that_skips,  # noqa: E402
                                       thresholds_that_skip, whole_call)
from tests.support.reference_helpers import assert_close, assert_same_mask  # noqa: E402


def simulate(q, k, v, thresholds, *, world, layout, causal=True):
    """Each rank's RankAttention fed the shards in the order the ring delivers them (own, rank-1, ...)."""
    qs, ks, vs = ([torch.from_numpy(np.ascontiguousarray(shard(x, r, world, layout))) for r in range(world)]
                  for x in (q, k, v))
    states = []
    for r in range(world):
        st = RankAttention(qs[r], thresholds, rank=r, world=world, layout=layout, causal=causal, softmax_scale=None,
                           want_keep=True, call=reference_call)
        for step in range(world):
            src = (r - step) % world
            st.attend(ks[src], vs[src], src)
        states.append(st)
    return states


def unsharded(states, layout):
    res = [st.result() for st in states]
    return tuple(unshard([x[i].numpy() for x in res], layout, dim) for i, dim in ((0, 1), (1, 2), (2, 2)))


CASES = ([(world, layout, thr, True) for world in (1, 2, 3, 4) for layout in ("zigzag", "contiguous")
          for thr in (None, "table")]
         + [(2, "zigzag", "scalar", True), (3, "contiguous", "scalar", True)]
         + [(world, "zigzag", "table", False) for world in (2, 3)] + [(2, "contiguous", None, False)])


@pytest.mark.parametrize("world,layout,thresholds,causal", CASES)
def test_ring_equals_the_whole_call(world, layout, thresholds, causal):
    n = world * 2 * 128
    q, k, v = problem(n, seed=world, dtype=np.float64)
    if thresholds == "table":
        thresholds = thresholds_that_skip(q, k, causal=causal)
    elif thresholds == "scalar":
        thresholds = scalar_that_skips(q, k, causal=causal)
    want_out, want_lse, want_keep = whole_call(q, k, v, thresholds, causal)
    states = simulate(q, k, v, thresholds, world=world, layout=layout, causal=causal)
    out, lse, keep = unsharded(states, layout)
    assert_same_mask(keep, want_keep, f"keep, {world} ranks {layout}")
    for r, st in enumerate(states):
        assert_same_mask(st.keep.numpy(), shard(want_keep, r, world, layout, dim=2), f"rank {r}'s keep")
    assert_close(lse, want_lse, RTOL64, ATOL64, "lse")
    assert_close(out, want_out, RTOL64, ATOL64, "out")
    if thresholds is not None:
        cand = R.attention(q, k, v, causal=causal, return_keep=True)[1]
        assert (cand & ~keep).any(), "the thresholds must skip some candidate tiles"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_float32_inputs_merge_in_float32(layout):
    q, k, v = problem(1024, batch=2, seed=11)
    thr = thresholds_that_skip(q, k)
    want_out, want_lse, want_keep = whole_call(q, k, v, thr)
    states = simulate(q, k, v, thr, world=4, layout=layout)
    assert states[0].out.dtype == torch.float32 and states[0].result()[0].dtype == torch.float32
    out, lse, keep = unsharded(states, layout)
    assert_same_mask(keep, want_keep, "keep")
    assert_close(lse, want_lse, RTOL32, ATOL32, "lse")
    assert_close(out, want_out, RTOL32, ATOL32, "out")


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_only_pairs_with_a_valid_entry_are_computed(layout, world):
    """Each (query chunk, key chunk) with a valid causal entry is computed once, by its query's rank."""
    n = world * 2 * 128
    q, k, v = problem(n, seed=3, dtype=np.float64)
    states = simulate(q, k, v, None, world=world, layout=layout)
    chunk = n // world // (2 if layout == "zigzag" else 1)
    starts = range(0, n, chunk)
    want = sorted((a, b) for a in starts for b in starts if b <= a)  # chunks are aligned: b <= a iff any valid
    got = sorted(p for st in states for p in st.pairs_computed)
    assert got == want, f"computed {got}, expected {want}"
    for st in states:
        for qs in st.spans:
            for src in range(world):
                for ks in spans(src, world, n // world, layout):
                    assert fully_masked(qs, ks, True) == (ks.start > qs.start), (qs, ks)
    if layout == "zigzag":  # the point of zigzag: equal work on every rank
        area = [sum(min(chunk, a + chunk - b) for a, b in st.pairs_computed) for st in states]
        assert len(set(area)) == 1, f"rows x keys per rank differ: {area}"


def test_nonfinite_inputs_reach_the_rows_the_whole_call_poisons():
    q, k, v = problem(512, seed=5, dtype=np.float64)
    q[0, 300, 1, 3] = np.nan
    v[0, 70, 0, 2] = np.inf
    for thresholds in (None, thresholds_that_skip(q, k)):
        want_out, want_lse, want_keep = whole_call(q, k, v, thresholds)
        assert np.isnan(want_out).any() and np.isnan(want_lse).any()
        out, lse, keep = unsharded(simulate(q, k, v, thresholds, world=2, layout="zigzag"), "zigzag")
        assert_same_mask(keep, want_keep, "keep")
        assert_close(lse, want_lse, RTOL64, ATOL64, "lse with a NaN query row")
        assert_close(out, want_out, RTOL64, ATOL64, "out with a NaN query row and an inf value")


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_merge_into_follows_merge_partials(dtype, rtol):
    rng = np.random.default_rng(0)
    B, n, H, D = 2, 6, 3, 4
    outs = [rng.standard_normal((B, n, H, D)) for _ in range(3)]
    lses = [rng.standard_normal((B, H, n)) * 20 for _ in range(3)]
    lses[0][0, 0, :] = -np.inf  # a part with no kept key for row 0..5 of head 0
    for part in lses:
        part[1, 2, 1] = -np.inf  # a row empty in every part
    outs[2][1, 1, 2, 3] = np.nan  # ... whose out holds a NaN (a non-finite v on a kept tile)
    lses[1][1, 1, 4] = np.nan
    lses[2][0, 2, 5] = np.inf
    want_out, want_lse = R.merge_partials(outs, lses)
    acc_out = torch.tensor(outs[0], dtype=dtype)
    acc_lse = torch.tensor(lses[0], dtype=dtype)
    for o, l in zip(outs[1:], lses[1:]):
        merge_into(acc_out, acc_lse, torch.tensor(o, dtype=dtype), torch.tensor(l, dtype=dtype))
    assert np.isneginf(want_lse[1, 2, 1]) and np.isnan(want_out[1, 1, 2, 3]) and want_out[1, 1, 2, 0] == 0
    assert_close(acc_lse.numpy(), want_lse, rtol, rtol, "lse")
    assert_close(acc_out.numpy(), want_out, rtol, rtol, "out")


def test_merge_into_writes_through_views():
    """The ring merges into slices of the rank's accumulators; the other rows must not move."""
    acc_out, acc_lse = torch.zeros(1, 4, 1, 2), torch.full((1, 1, 4), -math.inf)
    acc_out[:, :2], acc_lse[..., :2] = 1.0, 0.0
    merge_into(acc_out[:, :2], acc_lse[..., :2], torch.full((1, 2, 1, 2), 3.0), torch.zeros(1, 1, 2))
    assert acc_out[0, :, 0, 0].tolist() == [2.0, 2.0, 0.0, 0.0]
    assert acc_lse[0, 0].tolist()[:2] == pytest.approx([math.log(2)] * 2) and math.isinf(acc_lse[0, 0, 3])
