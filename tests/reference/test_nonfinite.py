"""NaN and ±inf in q, k, v: the contract of bsfa_reference.attention / block_max_scores (what the
kernels do), checked against an entry-by-entry transcription of it, and the calibration refusals."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import bsfa_reference as R
from tests.support.online_softmax import dense_softmax_attention, is_diagonal, position_of, valid_entries
from tests.support.reference_helpers import RTOL64, ATOL64, assert_close, assert_same_mask, make_qkv

SMALL = dict(block_m=16, block_n=8)


# ---------------------------------------------------------------------------------------------
# the contract, one entry at a time
# ---------------------------------------------------------------------------------------------


def _fmax(x, y):
    """IEEE maxNum: a NaN operand is ignored unless both are NaN."""
    if math.isnan(x):
        return y
    if math.isnan(y):
        return x
    return max(x, y)


def contract(q, k, v, thresholds=None, *, causal, scale, block_m, block_n, keep=None):
    """out, lse, keep, tile_max as the docstring of bsfa_reference.attention states them."""
    q, k, v = (np.asarray(x).astype(np.float64) for x in (q, k, v))
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    nQ, nK = -(-Nq // block_m), -(-Nk // block_n)
    valid = valid_entries(Nq, Nk, causal)
    t32 = None if thresholds is None else np.asarray(thresholds, dtype=np.float32)
    out = np.zeros((B, Nq, Hq, D))
    lse = np.full((B, Hq, Nq), -np.inf)
    kept = np.zeros((B, Hq, nQ, nK), dtype=bool)
    tile_max = np.zeros((B, Hq, nQ, nK))
    for b in range(B):
        for h in range(Hq):
            kv = h // group
            with np.errstate(invalid="ignore", over="ignore"):  # elementwise IEEE products, then a sum
                s = np.sum(q[b, :, h, None, :] * k[b, None, :, kv, :], axis=-1) * scale
            for a in range(nQ):
                for c in range(nK):
                    rows, cols = range(a * block_m, (a + 1) * block_m), range(c * block_n, (c + 1) * block_n)
                    box = [s[i, j] if i < Nq and j < Nk and valid[i, j] else -math.inf for i in rows for j in cols]
                    M = functools.reduce(_fmax, box)
                    tile_max[b, h, a, c] = M
                    cand = bool(valid[a * block_m:(a + 1) * block_m, c * block_n:(c + 1) * block_n].any())
                    if keep is not None:
                        kept[b, h, a, c] = cand and keep[b, h, a, c]
                    elif t32 is None:
                        kept[b, h, a, c] = cand
                    else:
                        col = min(max(position_of(a, Nq, Nk, block_m), 0), t32.shape[1] - 1) if t32.ndim else 0
                        t = float(t32 if t32.ndim == 0 else t32[h, col])
                        kept[b, h, a, c] = cand and (is_diagonal(a, c, Nq, Nk, block_m, block_n) or M >= t)
            for i in range(Nq):
                row = [(j, s[i, j]) for j in range(Nk) if valid[i, j] and kept[b, h, i // block_m, j // block_n]]
                if any(math.isnan(x) or x == math.inf for _, x in row):
                    out[b, i, h, :] = np.nan
                    lse[b, h, i] = np.nan
                    continue
                row = [(j, x) for j, x in row if x > -math.inf]
                if not row:
                    continue
                m = max(x for _, x in row)
                w = np.array([math.exp(x - m) for _, x in row])
                lse[b, h, i] = m + math.log(w.sum())
                vv = np.array([np.where(np.isfinite(v[b, j, kv]), v[b, j, kv], 0.0) for j, _ in row])
                out[b, i, h, :] = (w / w.sum()) @ vv
            for a, c in zip(*np.nonzero(kept[b, h])):
                for j in range(c * block_n, min((c + 1) * block_n, Nk)):
                    bad = ~np.isfinite(v[b, j, kv])
                    out[b, a * block_m:(a + 1) * block_m, h, bad] = np.nan
    return out, lse, kept, tile_max


@st.composite
def nonfinite_problems(draw):
    """A small problem (the transcription is slow) with a few NaN / ±inf placed in q, k or v,
    sometimes as whole rows or whole key tiles (all-NaN tile boxes)."""
    group = draw(st.sampled_from([1, 2]))
    Hkv = draw(st.sampled_from([1, 2]))
    B = draw(st.integers(1, 2))
    Nq, Nk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    D = draw(st.sampled_from([1, 2, 4, 8]))
    block_m, block_n = draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([1, 2, 4, 8]))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from([np.float64, np.float16]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(B, Nq, Nk, Hkv * group, Hkv, D, dtype=np.float64, seed=seed)
    arrays = {"q": q, "k": k, "v": v}
    for _ in range(draw(st.integers(0, 4))):
        which = draw(st.sampled_from("qkv"))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        x = arrays[which]
        b, n, h = rng.integers(x.shape[0]), rng.integers(x.shape[1]), rng.integers(x.shape[2])
        how = draw(st.sampled_from(["entry", "entry", "row", "tile"]))
        if how == "entry":
            x[b, n, h, rng.integers(D)] = value
        elif how == "row":
            x[b, n, h, :] = value
        else:  # a whole key tile, or a whole query tile
            size = block_n if which != "q" else block_m
            start = (n // size) * size
            x[b, start:start + size, h, :] = value
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    q, k, v = (arrays[n].astype(dtype) for n in "qkv")
    return q, k, v, dict(causal=causal, softmax_scale=scale, block_m=block_m, block_n=block_n)


def _finite_thresholds(data, tile_max, Hq, nQ):
    finite = tile_max[np.isfinite(tile_max)]
    lo, hi = (float(finite.min()) - 0.1, float(finite.max()) + 0.1) if finite.size else (-1.0, 1.0)
    kind = data.draw(st.sampled_from(["none", "scalar", "-inf", "array", "keep"]), label="gate")
    if kind == "none":
        return None
    if kind == "-inf":
        return -math.inf
    if kind == "scalar":
        return data.draw(st.floats(lo, hi), label="scalar threshold")
    if kind == "keep":
        return "keep"
    T = data.draw(st.integers(1, nQ + 1), label="T")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="threshold seed"))
    thr = rng.uniform(lo, hi, size=(Hq, T))
    thr[rng.random((Hq, T)) < 0.1] = -np.inf
    return thr.astype(np.float32)


@given(nonfinite_problems(), st.data())
def test_nonfinite_inputs_follow_the_contract(problem, data):
    """out, lse, keep and tile maxima equal the entry-by-entry contract; non-finite values in the
    same places (NaN as NaN, ±inf as the same infinity)."""
    q, k, v, kw = problem
    note(f"shapes q {q.shape} k {k.shape}, {kw}; non-finite: q {int((~np.isfinite(q)).sum())}, "
         f"k {int((~np.isfinite(k)).sum())}, v {int((~np.isfinite(v)).sum())}")
    B, Nq, Hq, D = q.shape
    nQ, nK = -(-Nq // kw["block_m"]), -(-k.shape[1] // kw["block_n"])
    tile_max = R.block_max_scores(q, k, **kw)
    thr = _finite_thresholds(data, tile_max, Hq, nQ)
    keep = None
    if isinstance(thr, str):
        seed = data.draw(st.integers(0, 2**32 - 1), label="keep seed")
        keep, thr = np.random.default_rng(seed).random((B, Hq, nQ, nK)) < 0.6, None
    out, lse, kept = R.attention(q, k, v, thr, keep=keep, return_lse=True, return_keep=True, **kw)
    scale = 1 / math.sqrt(D) if kw["softmax_scale"] is None else kw["softmax_scale"]
    e_out, e_lse, e_keep, e_max = contract(q, k, v, thr, keep=keep, causal=kw["causal"], scale=scale,
                                           block_m=kw["block_m"], block_n=kw["block_n"])
    assert_close(tile_max, e_max, RTOL64, ATOL64, "block_max_scores vs contract")
    assert_same_mask(kept, e_keep, "keep vs contract")
    assert_close(lse, e_lse, 1e-9, 1e-9, "lse vs contract")
    assert_close(out, e_out, 1e-9, 1e-9, "out vs contract")


# ---------------------------------------------------------------------------------------------
# examples: which rows and columns a non-finite value reaches
# ---------------------------------------------------------------------------------------------


def _rows(lse):
    return np.isnan(lse)


@pytest.mark.parametrize("thresholds", [None, 0.0, "array"])
def test_nan_in_q_poisons_exactly_its_row_of_its_head(thresholds):
    """GQA 4:2: a NaN in q[b, i, h, d] makes row i of head h NaN (out and lse) and nothing else;
    the other heads of its kv group are untouched. Dense, the rest equals the finite result; gated,
    it equals the finite inputs replayed with the returned keep (the NaN row no longer counts in its
    tiles' maxima, which may move other rows' tiles across the threshold)."""
    q, k, v = make_qkv(2, 50, 60, 4, 2, 8, seed=11, spread=3.0)
    thr = np.linspace(-0.5, 1.5, 4 * 4, dtype=np.float32).reshape(4, 4) if thresholds == "array" else thresholds
    bad = q.copy()
    bad[1, 37, 2, 5] = np.nan
    out, lse, keep = R.attention(bad, k, v, thr, return_lse=True, return_keep=True, **SMALL)
    want_rows = np.zeros(lse.shape, bool)
    want_rows[1, 2, 37] = True
    assert_same_mask(np.isnan(lse), want_rows, "NaN lse rows")
    assert_same_mask(np.isnan(out).any(axis=-1), want_rows.transpose(0, 2, 1), "rows with a NaN in out")
    assert np.isnan(out[1, 37, 2]).all(), "the whole row is NaN"
    if thresholds is None:
        ref_out, ref_lse = R.attention(q, k, v, return_lse=True, **SMALL)
    else:
        ref_out, ref_lse = R.attention(q, k, v, keep=keep, return_lse=True, **SMALL)
    ok = ~want_rows
    assert_close(lse[ok], ref_lse[ok], RTOL64, ATOL64, "lse of the other rows")
    assert_close(out[ok.transpose(0, 2, 1)], ref_out[ok.transpose(0, 2, 1)], RTOL64, ATOL64, "out of the other rows")


@pytest.mark.parametrize("value", [np.nan, "mixed inf"])
@pytest.mark.parametrize("causal", [True, False])
def test_nonfinite_key_poisons_exactly_the_rows_that_keep_it(value, causal):
    """NaN in k[b, j, g, d] (or +inf in every dimension against q of mixed signs: +inf and -inf
    products, NaN) makes NaN exactly the rows of kv group g's heads for which key j is valid and in
    a kept tile; the other rows equal the finite inputs replayed with the same keep."""
    j, g = 29, 1
    q, k, v = make_qkv(1, 48, 56, 4, 2, 8, seed=12, spread=3.0)
    q[..., 0], q[..., 1] = np.abs(q[..., 0]) + 0.1, -np.abs(q[..., 1]) - 0.1  # mixed signs in every row
    bad = k.copy()
    if value == "mixed inf":
        bad[0, j, g, :] = np.inf
    else:
        bad[0, j, g, 3] = np.nan
    out, lse, keep = R.attention(q, bad, v, 0.3, causal=causal, return_lse=True, return_keep=True, **SMALL)
    valid = valid_entries(48, 56, causal)
    want = np.zeros(lse.shape, bool)
    for h in (2, 3):  # the heads reading kv head 1
        for i in range(48):
            want[0, h, i] = valid[i, j] and keep[0, h, i // 16, j // 8]
    assert want.any() and not want.all(), "the example must have rows on both sides"
    assert_same_mask(np.isnan(lse), want, "NaN lse rows")
    assert_same_mask(np.isnan(out).all(axis=-1), want.transpose(0, 2, 1), "all-NaN out rows")
    assert_same_mask(np.isnan(out).any(axis=-1), want.transpose(0, 2, 1), "rows with a NaN in out")
    ref_out, ref_lse = R.attention(q, k, v, keep=keep, causal=causal, return_lse=True, **SMALL)
    ok = ~want
    assert_close(lse[ok], ref_lse[ok], RTOL64, ATOL64, "lse of the other rows")
    assert_close(out[ok.transpose(0, 2, 1)], ref_out[ok.transpose(0, 2, 1)], RTOL64, ATOL64, "out of the other rows")


def test_minus_inf_score_adds_nothing_and_all_minus_inf_is_an_empty_row():
    """k[j, 0] = -inf against q[:, 0] > 0 gives s[:, j] = -inf: key j drops out of every softmax
    (exp(-inf) = 0). q[i, 0] = -inf against k[:, 0] > 0 gives row i only -inf scores: out 0,
    lse -inf, like a row with no kept key. q[i, 0] = +inf: only +inf scores, a NaN row."""
    q, k, v = make_qkv(1, 40, 40, 2, 1, 8, seed=13)
    q[..., 0] = np.abs(q[..., 0]) + 0.1
    k[..., 0] = np.abs(k[..., 0]) + 0.1
    k2 = k.copy()
    k2[0, 17, 0, 0] = -np.inf
    out, lse, keep = R.attention(q, k2, v, causal=False, return_lse=True, return_keep=True, **SMALL)
    allowed = np.ones((1, 2, 40, 40), bool)
    allowed[..., 17] = False
    e_out, e_lse = dense_softmax_attention(q, k, v, causal=False, allowed=allowed)
    assert_close(out, e_out, RTOL64, ATOL64, "out without key 17")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse without key 17")

    q2 = q.copy()
    q2[0, 5, 1, 0] = -np.inf
    q2[0, 30, 0, 0] = np.inf
    out, lse = R.attention(q2, k, v, causal=False, return_lse=True, **SMALL)
    assert lse[0, 1, 5] == -np.inf and (out[0, 5, 1] == 0).all(), "all -inf: an empty row"
    assert np.isnan(lse[0, 0, 30]) and np.isnan(out[0, 30, 0]).all(), "+inf: a NaN row"
    ref_out, ref_lse = R.attention(q, k, v, causal=False, return_lse=True, **SMALL)
    ok = np.ones(lse.shape, bool)
    ok[0, 1, 5] = ok[0, 0, 30] = False
    assert_close(lse[ok], ref_lse[ok], RTOL64, ATOL64, "lse of the other rows")
    assert_close(out[ok.transpose(0, 2, 1)], ref_out[ok.transpose(0, 2, 1)], RTOL64, ATOL64, "out of the other rows")


@pytest.mark.parametrize("thresholds,kept_below", [(None, True), (-math.inf, False), (0.0, False)])
def test_tile_with_nan_maximum_diagonal_kept_other_gated(thresholds, kept_below):
    """Non-causal 16 x 16 in 8 x 8 tiles, keys 0..7 all NaN: tiles (0, 0) and (1, 0) are all
    valid and all NaN, so their maximum is NaN. (0, 0) is diagonal: kept, rows 0..7 NaN. (1, 0) is
    not: a NaN maximum fails every threshold, -inf too; only thresholds=None keeps it."""
    q, k, v = make_qkv(1, 16, 16, 1, 1, 4, seed=14)
    k[0, :8] = np.nan
    kw = dict(causal=False, block_m=8, block_n=8)
    tm = R.block_max_scores(q, k, **kw)
    assert np.isnan(tm[0, 0, :, 0]).all() and np.isfinite(tm[0, 0, :, 1]).all()
    out, lse, keep = R.attention(q, k, v, thresholds, return_lse=True, return_keep=True, **kw)
    assert_same_mask(keep[0, 0], np.array([[True, True], [kept_below, True]]), "keep")
    assert np.isnan(lse[0, 0, :8]).all() and np.isnan(out[0, :8]).all()
    if kept_below:
        assert np.isnan(lse[0, 0, 8:]).all()
    else:
        allowed = np.zeros((1, 1, 16, 16), bool)
        allowed[..., 8:, 8:] = True
        e_out, e_lse = dense_softmax_attention(q, k, v, causal=False, allowed=allowed)
        assert_close(out[0, 8:], e_out[0, 8:], RTOL64, ATOL64, "rows 8..15 over keys 8..15")
        assert_close(lse[0, 0, 8:], e_lse[0, 0, 8:], RTOL64, ATOL64, "lse rows 8..15")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_v_poisons_its_column_in_every_row_of_query_tiles_keeping_its_tile(value):
    """Causal 40 x 28, GQA 4:2, 8 x 8 tiles: v[0, 5, 1, 2] non-finite (key tile 0, kv head 1)
    makes out[0, i, 2] NaN for heads 2 and 3 and every row i of each query tile that keeps key
    tile 0 for that head. Query tile 1 (rows 8..15) keeps it as its diagonal: its rows 8..11 have
    no valid key at all (empty rows) and rows 12..15 have key 5 masked, and all are NaN there.
    Query tile 0 has no valid entry and stays 0; lse and every other entry are unchanged."""
    q, k, v = make_qkv(1, 40, 28, 4, 2, 4, seed=15, spread=3.0)
    bad = v.copy()
    bad[0, 5, 1, 2] = value
    thr = np.float32(0.4)
    out, lse, keep = R.attention(q, k, bad, thr, return_lse=True, return_keep=True, block_m=8, block_n=8)
    ref_out, ref_lse = R.attention(q, k, v, thr, return_lse=True, block_m=8, block_n=8)
    want = np.zeros(out.shape, bool)
    for h in (2, 3):
        for a in range(5):
            if keep[0, h, a, 0]:
                want[0, a * 8:(a + 1) * 8, h, 2] = True
    valid = valid_entries(40, 28, True)
    assert want[0, 8:16, 2:, 2].all() and not valid[8:12].any() and not valid[12:16, 5].any()
    assert not want[0, :8].any() and (out[0, :8] == 0).all()
    assert_same_mask(np.isnan(out), want, "NaN entries of out")
    assert_close(lse, ref_lse, 0, 0, "lse (v plays no part)")
    assert_close(out[~want], ref_out[~want], RTOL64, ATOL64, "out elsewhere")


def test_nonfinite_v_reaches_only_query_tiles_that_keep_its_tile():
    """At +inf only diagonal tiles are kept: key tile 0 only by query tile 0, so a NaN in v[0, 0]
    leaves query tiles 1..7 (which skip key tile 0, valid as it is for them) untouched."""
    q, k, v = make_qkv(1, 64, 64, 1, 1, 4, seed=16)
    out0, keep = R.attention(q, k, v, math.inf, return_keep=True, block_m=8, block_n=8)
    assert keep[0, 0, 0, 0] and not keep[0, 0, 1:, 0].any()
    bad = v.copy()
    bad[0, 0, 0, 1] = np.nan
    out = R.attention(q, k, bad, math.inf, block_m=8, block_n=8)
    want = np.zeros(out.shape, bool)
    want[0, :8, 0, 1] = True
    assert_same_mask(np.isnan(out), want, "NaN entries")
    assert_close(out[~want], out0[~want], 0, 0, "out elsewhere")


def test_keep_replay_follows_the_same_rules():
    """Replaying a mask with a NaN in q row 20 and an inf in v at key 2 (key tile 0): row 20 is
    NaN; column 3 is NaN in the rows of query tiles that replay key tile 0, no others; tiles
    without a valid entry stay dropped."""
    q, k, v = make_qkv(1, 32, 32, 1, 1, 4, seed=17)
    q[0, 20, 0, 1] = np.nan
    v[0, 2, 0, 3] = np.inf
    keep = np.zeros((1, 1, 4, 4), bool)
    keep[0, 0, 2, 0] = True  # query tile 2 (rows 16..23) replays key tile 0
    keep[0, 0, 3, 3] = True
    keep[0, 0, 0, 3] = True  # no valid entry (causal): dropped
    out, lse, kept = R.attention(q, k, v, keep=keep, return_lse=True, return_keep=True, block_m=8, block_n=8)
    want = keep.copy()
    want[0, 0, 0, 3] = False
    assert_same_mask(kept, want, "replayed keep")
    nan_rows = np.zeros((1, 1, 32), bool)
    nan_rows[0, 0, 20] = True
    assert_same_mask(np.isnan(lse), nan_rows, "NaN rows")
    nan_out = np.zeros(out.shape, bool)
    nan_out[0, 20] = True
    nan_out[0, 16:24, 0, 3] = True
    assert_same_mask(np.isnan(out), nan_out, "NaN entries of out")
    assert (lse[0, 0, :16] == -np.inf).all() and (out[0, :16] == 0).all()


# ---------------------------------------------------------------------------------------------
# block_max_scores
# ---------------------------------------------------------------------------------------------


def test_block_max_nan_rule_full_partial_and_causal_boxes():
    """Tile maximum over the whole box, invalid entries -inf, NaN ignored:
    * a box all valid and all NaN: NaN;
    * the same NaN rows in a ragged box (rows past Nq count as -inf): -inf;
    * a causal diagonal box whose valid entries are all NaN: -inf;
    * NaN next to finite scores: the finite maximum."""
    q, k, _ = make_qkv(1, 20, 16, 1, 1, 4, seed=18)
    q[0, :8] = np.nan  # query tile 0 (rows 0..7) all NaN
    q[0, 16:20] = np.nan  # ragged query tile 2 (rows 16..19 of a 16..23 box) all NaN
    tm = R.block_max_scores(q, k, causal=False, block_m=8, block_n=8)
    assert np.isnan(tm[0, 0, 0]).all(), "full all-NaN boxes"
    assert (tm[0, 0, 2] == -np.inf).all(), "ragged boxes: the missing rows count as -inf"
    assert np.isfinite(tm[0, 0, 1]).all()

    q, k, _ = make_qkv(1, 16, 16, 1, 1, 4, seed=19)
    finite = R.block_max_scores(q, k, block_m=8, block_n=8)
    q[0, 8:16] = np.nan  # query tile 1: diagonal box (1, 1) half valid, off-diagonal (1, 0) all valid
    tm = R.block_max_scores(q, k, block_m=8, block_n=8)
    assert np.isnan(tm[0, 0, 1, 0]), "all valid, all NaN"
    assert tm[0, 0, 1, 1] == -np.inf, "causal diagonal box: its masked entries count as -inf"
    assert tm[0, 0, 0, 1] == -np.inf, "no valid entry: -inf"
    q2, k2, _ = make_qkv(1, 16, 16, 1, 1, 4, seed=19)
    q2[0, 9, 0, 0] = np.nan  # one NaN row among finite ones
    tm2 = R.block_max_scores(q2, k2, block_m=8, block_n=8)
    s = (q2[0, :, 0] @ k2[0, :, 0].T) / 2.0
    valid = valid_entries(16, 16, True)
    rows = [i for i in range(8, 16) if i != 9]
    assert tm2[0, 0, 1, 0] == pytest.approx(np.max(s[rows, :8]), rel=1e-12)
    assert tm2[0, 0, 1, 1] == pytest.approx(np.max(np.where(valid, s, -np.inf)[rows, 8:]), rel=1e-12)
    assert tm2[0, 0, 0, 0] == finite[0, 0, 0, 0]


def test_gate_takes_candidates_from_the_mask_not_the_maximum():
    nan = np.full((1, 1, 2, 2), np.nan)
    keep = R.gate(nan, np.float32(-np.inf), 16, 16, 8, 8, causal=False)
    assert_same_mask(keep[0, 0], np.array([[True, False], [False, True]]), "NaN maxima: only the diagonal")
    keep = R.gate(nan, None, 16, 16, 8, 8, causal=True)
    assert_same_mask(keep[0, 0], np.array([[True, False], [True, True]]), "dense: every candidate")
    with pytest.raises(TypeError, match="causal"):
        R.gate(nan, None, 16, 16, 8, 8)  # candidates depend on the mask: no silent default


# ---------------------------------------------------------------------------------------------
# calibration refuses non-finite q and k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which,value", [("q", np.nan), ("k", np.inf), ("q", -np.inf), ("k", np.nan)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_calibrator_refuses_nonfinite_q_and_k(which, value, dtype):
    q, k, _ = make_qkv(2, 40, 40, 2, 1, 8, dtype=dtype, seed=20)
    cal = R.Calibrator([1, 2], **SMALL)
    cal.update(q, k)
    before = cal.thresholds()
    x = q.copy() if which == "q" else k.copy()
    x[1, 3, 0, 2] = value
    x[0, 5, 0, :] = value
    shape = x.shape
    with pytest.raises(ValueError, match=rf"{which}: expected finite values, got 9 NaN or ±inf of {x.size} "
                                         rf"in shape \({shape[0]}, {shape[1]}, {shape[2]}, {shape[3]}\)"):
        cal.update(x, k) if which == "q" else cal.update(q, x)
    assert cal.num_samples == 2
    np.testing.assert_array_equal(cal.thresholds(), before)


def test_calibrator_refuses_nonfinite_bfloat16():
    import ml_dtypes

    q, k, _ = make_qkv(1, 40, 40, 2, 1, 8, dtype=ml_dtypes.bfloat16, seed=21)
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"k: expected finite values, got 1 NaN"):
        R.Calibrator([1], **SMALL).update(q, k)


def test_sample_thresholds_refuses_nan_and_plus_inf_maxima():
    tm = np.zeros((1, 1, 2, 4))
    tm[0, 0, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"tile_max: expected finite maxima or -inf .* got 1 NaN or \+inf"):
        R.sample_thresholds(tm, (1,), 16, 32, 8, 8)
    tm[0, 0, 1, 0] = np.inf
    with pytest.raises(ValueError, match="got 1 NaN or"):
        R.sample_thresholds(tm, (1,), 16, 32, 8, 8)
    tm[0, 0, 1, 0] = -np.inf  # no valid entry: fine
    R.sample_thresholds(tm, (1,), 16, 32, 8, 8)


def test_finite_inputs_whose_scores_overflow_follow_the_same_rules():
    """q[0, 7] = 1e300 against k[:, 0] = ±1e10: finite inputs, but row 7's products overflow to
    ±inf, so row 7 is NaN; the other rows are as without it."""
    q, k, v = make_qkv(1, 24, 24, 1, 1, 4, seed=22)
    k[0, :, 0, 0] = np.where(np.arange(24) % 2, 1e10, -1e10)
    big = q.copy()
    big[0, 7, 0, :] = 1e300
    with np.errstate(over="ignore"):
        out, lse = R.attention(big, k, v, return_lse=True, **SMALL)
    want = np.zeros(lse.shape, bool)
    want[0, 0, 7] = True
    assert_same_mask(np.isnan(lse), want, "NaN rows")
    ref_out, ref_lse = R.attention(q, k, v, return_lse=True, **SMALL)
    assert_close(lse[~want], ref_lse[~want], RTOL64, ATOL64, "lse of the other rows")
