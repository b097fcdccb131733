"""Tests of bsfa_reference.Calibrator (the paper's calibration rule) and sample_thresholds."""
from __future__ import annotations

import statistics
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

import bsfa_reference as R
from tests.support.reference_helpers import assert_close, make_qkv, problems
from tests.support.online_softmax import is_diagonal, online_softmax_attention, position_of

k_values_st = st.lists(st.integers(1, 6), min_size=1, max_size=3, unique=True)


def independent_calibration(updates, k_values, block_m, block_n, reduce):
    """The calibration rule written from the spec.

    updates: list of (tile_max (B, Hq, nQ, nK), Nq, Nk). Every (sample, head, query tile) with more
    than k candidates (non-diagonal tiles with a valid entry) proposes the midpoint of its k-th and
    (k+1)-th largest candidate maxima at position clamp(p(a), 0, ...); proposals are reduced per
    (k, head, position). Returns float32 (len(k_values), Hq, T), -inf where nothing was proposed.
    """
    proposals = defaultdict(list)
    T, Hq = 0, updates[0][0].shape[1]
    for tile_max, Nq, Nk in updates:
        B, _, nQ, nK = tile_max.shape
        for a in range(nQ):
            pos = max(position_of(a, Nq, Nk, block_m), 0)
            T = max(T, pos + 1)
            for b in range(B):
                for h in range(Hq):
                    cand = sorted((float(tile_max[b, h, a, c]) for c in range(nK)
                                   if tile_max[b, h, a, c] > -np.inf
                                   and not is_diagonal(a, c, Nq, Nk, block_m, block_n)), reverse=True)
                    for i, k in enumerate(k_values):
                        if len(cand) > k:
                            proposals[(i, h, pos)].append((cand[k - 1] + cand[k]) / 2)
    out = np.full((len(k_values), Hq, T), -np.inf)
    for key, vals in proposals.items():
        out[key] = statistics.fmean(vals) if reduce == "mean" else statistics.median(vals)
    return out.astype(np.float32)


def onehot_qk(X):
    """q, k with softmax_scale=1 whose scores are exactly X (B, Nq, Nk): k is the identity."""
    X = np.asarray(X, dtype=np.float64)
    B, Nq, Nk = X.shape
    q = X[:, :, None, :].copy()  # (B, Nq, 1, D=Nk)
    k = np.broadcast_to(np.eye(Nk)[None, :, None, :], (B, Nk, 1, Nk)).copy()
    return q, k


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


@given(problems(max_n=260, max_batch=3), k_values_st, st.sampled_from(["mean", "median"]),
       st.lists(st.tuples(st.integers(1, 260), st.integers(1, 260), st.integers(0, 2**32 - 1)),
                max_size=2))
def test_calibrator_matches_independent_rule(p, k_values, reduce, more):
    """Streaming Calibrator over 1-3 updates of different lengths equals the spec's rule computed
    from the loop's tile maxima."""
    note(f"problem: {p}")
    cal = R.Calibrator(k_values, reduce=reduce, **p.kwargs())
    updates = []
    for Nq, Nk, seed in [(p.Nq, p.Nk, p.seed)] + more:
        q, k, v = make_qkv(p.B, Nq, Nk, p.Hq, p.Hkv, p.D, p.dtype, seed, p.spread)
        cal.update(q, k)
        tile_max = online_softmax_attention(q, k, v, None, **p.kwargs())[3]
        updates.append((tile_max, Nq, Nk))
    got = cal.thresholds()
    want = independent_calibration(updates, k_values, p.block_m, p.block_n, reduce)
    assert got.dtype == np.float32
    assert_close(got, want, 1e-6, 1e-6, f"Calibrator.thresholds ({reduce})")
    assert cal.num_samples == p.B * (1 + len(more))
    event(f"finite thresholds: {'some' if np.isfinite(got).any() else 'none'}")


def check_self_application(q, k_, v, k, reduce, kwargs):
    """Calibrate k on the single sample (q, k_), apply the thresholds to it, check the kept counts.
    Returns (#(head, tile) checked to keep all candidates, #checked to keep exactly k, #float32 ties
    skipped at unshared positions)."""
    cal = R.Calibrator([k], reduce=reduce, **kwargs)
    cal.update(q, k_)
    thr = cal.thresholds()[0]  # (Hq, T)
    keep = R.attention(q, k_, v, thr, return_keep=True, **kwargs)[1][0]  # (Hq, nQ, nK)
    tile_max = R.block_max_scores(q, k_, **kwargs)[0]
    Nq, Nk = q.shape[1], k_.shape[1]
    diag = R.diagonal_tiles(Nq, Nk, kwargs["block_m"], kwargs["block_n"])
    positions = np.maximum(R.tile_positions(Nq, Nk, kwargs["block_m"]), 0)
    shared = {int(x) for x in positions if (positions == x).sum() > 1}
    checked = checked_k = ties = 0
    for a in range(len(positions)):
        pos = int(positions[a])
        cand_mask = np.isfinite(tile_max[:, a]) & ~diag[a][None, :]  # (Hq, nK)
        assert not (diag[a][None, :] & np.isfinite(tile_max[:, a]) & ~keep[:, a]).any(), \
            "a diagonal tile with a valid entry was skipped"
        for h in range(q.shape[2]):
            vals = np.sort(tile_max[h, a][cand_mask[h]])[::-1]
            n = len(vals)
            t = float(thr[h, min(pos, thr.shape[1] - 1)])
            kept = int((keep[h, a] & cand_mask[h]).sum())
            if pos not in shared:  # the threshold comes from this tile alone
                if n <= k:
                    assert t == -np.inf, f"h={h} a={a}: {n} <= k={k} candidates must give -inf, got {t}"
                else:
                    assert np.isfinite(t), f"h={h} a={a}: {n} > k={k} candidates must give a threshold"
            if n <= k and t == -np.inf:
                assert kept == n, f"h={h} a={a}: threshold -inf kept {kept} of {n} candidates"
                checked += 1
            elif n > k and vals[k] < t <= vals[k - 1]:
                assert kept == k, (f"h={h} a={a}: kept {kept} non-diagonal tiles, expected k={k} "
                                   f"(threshold {t!r}, k-th {vals[k - 1]!r}, (k+1)-th {vals[k]!r})")
                checked_k += 1
            elif pos not in shared:
                ties += 1
    return checked, checked_k, ties


@given(problems(max_n=300, max_batch=1), st.integers(1, 6), st.sampled_from(["mean", "median"]))
def test_calibrated_threshold_keeps_k_tiles_on_its_sample(p, k, reduce):
    """Applied to its own single sample, the calibrated threshold keeps exactly min(k, #candidates)
    non-diagonal tiles of every (head, query tile) whose float32 threshold lies strictly between the
    k-th and (k+1)-th largest candidate maxima (ties at float32 precision are skipped)."""
    note(f"problem: {p}")
    q, k_, v = p.arrays()
    checked, checked_k, ties = check_self_application(q, k_, v, k, reduce, p.kwargs())
    event(f"(head, tile) pairs checked to keep all candidates: {'some' if checked else 'none'}")
    event(f"(head, tile) pairs checked to keep exactly k: {'some' if checked_k else 'none'}")
    event(f"float32 ties skipped: {'some' if ties else 'none'}")


@pytest.mark.parametrize("Nq,Nk,block_m,block_n,causal", [
    (600, 600, 32, 16, True),
    (300, 700, 128, 64, True),
    (700, 300, 32, 8, True),
    (250, 333, 16, 16, False),
])
@pytest.mark.parametrize("k", [1, 3])
def test_calibrated_threshold_keeps_k_tiles_examples(Nq, Nk, block_m, block_n, causal, k):
    q, k_, v = make_qkv(1, Nq, Nk, 4, 2, 32, seed=Nq * Nk + k, spread=3.0)
    kw = dict(causal=causal, softmax_scale=None, block_m=block_m, block_n=block_n)
    checked, checked_k, ties = check_self_application(q, k_, v, k, "mean", kw)
    assert checked_k > 0, "the example must exercise the exactly-k case"
    assert ties <= checked_k // 10 + 2, f"too many float32 ties: {ties} (vs {checked_k} checked)"


@given(problems(max_n=200, max_batch=3), st.sampled_from(["mean", "median"]))
def test_every_batch_element_is_a_sample(p, reduce):
    """One update with B samples equals B updates of one sample each; k_values order is kept."""
    note(f"problem: {p}")
    q, k, _ = p.arrays()
    whole = R.Calibrator([1, 3], reduce=reduce, **p.kwargs())
    whole.update(q, k)
    split = R.Calibrator([3, 1], reduce=reduce, **p.kwargs())
    for b in range(p.B):
        split.update(q[b:b + 1], k[b:b + 1])
    assert whole.num_samples == split.num_samples == p.B
    assert_close(split.thresholds()[::-1], whole.thresholds(), 1e-6, 1e-6, "split vs whole batch")


# ---------------------------------------------------------------------------------------------
# hand-made tile maxima
# ---------------------------------------------------------------------------------------------

# three samples, 1 x 1 tiles, non-causal 4 x 4: tile max = score; query tile a's diagonal is key a
X3 = np.array([
    [[0, 10, 8, 0], [1, 0, 2, 3], [5, 6, 0, 7], [9, 9, 1, 0]],
    [[0, 4, 2, 1], [1, 0, 1, 1], [5, 6, 0, 7], [2, 4, 8, 0]],
    [[0, -1, -3, -100], [1, 0, 1, 3], [5, 6, 0, 7], [0, 0, 0, 0]],
], dtype=np.float64)


def _midpoints(row, diag_index, k):
    cand = sorted((x for c, x in enumerate(row) if c != diag_index), reverse=True)
    return (cand[k - 1] + cand[k]) / 2


@pytest.mark.parametrize("reduce", ["mean", "median"])
def test_mean_and_median_on_hand_made_maxima(reduce):
    q, k = onehot_qk(X3)
    tm = R.block_max_scores(q, k, causal=False, softmax_scale=1.0, block_m=1, block_n=1)
    assert_close(tm[:, 0], X3, 0, 0, "one-hot tile maxima")
    cal = R.Calibrator([1, 2, 3], causal=False, softmax_scale=1.0, block_m=1, block_n=1, reduce=reduce)
    cal.update(q, k)
    got = cal.thresholds()
    assert got.shape == (3, 1, 4) and got.dtype == np.float32
    # position 0 by hand: k=1 midpoints 9, 3, -2; k=2 midpoints 4, 1.5, -51.5
    if reduce == "mean":
        assert got[0, 0, 0] == np.float32(10 / 3) and got[1, 0, 0] == np.float32(-46 / 3)
    else:
        assert got[0, 0, 0] == np.float32(3.0) and got[1, 0, 0] == np.float32(1.5)
    agg = statistics.fmean if reduce == "mean" else statistics.median
    for kk in (1, 2):
        for a in range(4):
            want = np.float32(agg([_midpoints(X3[b, a], a, kk) for b in range(3)]))
            assert got[kk - 1, 0, a] == want, (kk, a, got[kk - 1, 0, a], want)
    # 3 candidates per tile: k = 3 never has a (k+1)-th candidate
    assert (got[2] == -np.inf).all()


def test_mean_and_median_differ():
    q, k = onehot_qk(X3)
    kw = dict(causal=False, softmax_scale=1.0, block_m=1, block_n=1)
    mean, median = R.Calibrator([1], **kw), R.Calibrator([1], reduce="median", **kw)
    mean.update(q, k)
    median.update(q, k)
    assert mean.reduce == "mean" and median.reduce == "median"
    assert mean.thresholds()[0, 0, 0] != median.thresholds()[0, 0, 0]


def test_unreached_positions_are_minus_inf():
    """Nq = 1, Nk = 4 causal with 1 x 1 tiles: the query sits at position 3; positions 0-2 were
    never reached and stay -inf; T = 4."""
    X = np.array([[[3.0, 1.0, 2.0, 0.0]]])
    q, k = onehot_qk(X)
    cal = R.Calibrator([1, 2, 3], softmax_scale=1.0, block_m=1, block_n=1)
    cal.update(q, k)
    got = cal.thresholds()
    assert got.shape == (3, 1, 4)
    assert (got[:, :, :3] == -np.inf).all()
    assert got[0, 0, 3] == np.float32(2.5)   # candidates (keys 0-2) 3, 2, 1
    assert got[1, 0, 3] == np.float32(1.5)
    assert got[2, 0, 3] == -np.inf           # only 3 candidates


def test_samples_without_enough_candidates_do_not_count():
    """block 2 x 1 causal. Update A (Nq=1, Nk=4): query tile 0 at position 1 has candidates keys
    0-2. Update B (Nq=2, Nk=4): query tile 0 at position 1 has candidates keys 0-1 only (keys 2-3
    are diagonal). For k = 2 only A proposes; for k = 1 both do."""
    XA = np.array([[[4.0, 2.0, 0.0, 9.0]]])
    XB = np.array([[[6.0, 1.0, 9.0, 9.0], [6.0, 1.0, 9.0, 9.0]]])
    for reduce in ("mean", "median"):
        cal = R.Calibrator([1, 2], softmax_scale=1.0, block_m=2, block_n=1, reduce=reduce)
        for X in (XA, XB):
            cal.update(*onehot_qk(X))
        got = cal.thresholds()
        assert got.shape == (2, 1, 2)
        assert (got[:, :, 0] == -np.inf).all()
        assert got[0, 0, 1] == np.float32(((4 + 2) / 2 + (6 + 1) / 2) / 2)  # mean == median of two
        assert got[1, 0, 1] == np.float32((2 + 0) / 2)


def test_clamped_query_tiles_each_propose():
    """Nq > Nk: query tiles at negative positions clamp to position 0, each proposing there (the
    reference's documented reading of 'per (k, head, position)')."""
    X = np.array([[[0.0, 5.0, 1.0], [0.0, 3.0, 2.0], [7.0, 0.0, 6.0], [7.0, 8.0, 0.0]]])  # Nq=4, Nk=3
    q, k = onehot_qk(X)
    assert list(R.tile_positions(4, 3, 1)) == [-1, 0, 1, 2]
    cal = R.Calibrator([1], causal=False, softmax_scale=1.0, block_m=1, block_n=1)
    cal.update(q, k)
    got = cal.thresholds()
    assert got.shape == (1, 1, 3)
    # a=0 (pos -1 -> 0) diagonal key 0: cands 5, 1 -> 3; a=1 (pos 0) diagonal key 0: cands 3, 2 -> 2.5
    assert got[0, 0, 0] == np.float32((3 + 2.5) / 2)
    assert got[0, 0, 1] == np.float32(6.5)   # a=2 diagonal key 1: cands 7, 6
    assert got[0, 0, 2] == np.float32(7.5)   # a=3 diagonal key 2: cands 8, 7
