"""Property and example tests of bsfa_reference.attention / block_max_scores against independent
formulations (tests/online_softmax.py) and the spec."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

import bsfa_reference as R
from tests.support.reference_helpers import (
    ATOL64,
    RTOL64,
    assert_close,
    assert_same_mask,
    draw_thresholds,
    make_qkv,
    problems,
)
from tests.support.online_softmax import (
    dense_softmax_attention,
    is_diagonal,
    online_softmax_attention,
    position_of,
    valid_entries,
)


def tile_has_valid(Nq, Nk, causal, block_m, block_n):
    """(nQ, nK) bool: tile contains at least one valid (i, j), by direct inspection."""
    valid = valid_entries(Nq, Nk, causal)
    nQ, nK = -(-Nq // block_m), -(-Nk // block_n)
    out = np.zeros((nQ, nK), dtype=bool)
    for a in range(nQ):
        for c in range(nK):
            out[a, c] = valid[a * block_m:(a + 1) * block_m, c * block_n:(c + 1) * block_n].any()
    return out


def diagonal_table(Nq, Nk, block_m, block_n):
    nQ, nK = -(-Nq // block_m), -(-Nk // block_n)
    return np.array([[is_diagonal(a, c, Nq, Nk, block_m, block_n) for c in range(nK)] for a in range(nQ)],
                    dtype=bool).reshape(nQ, nK)


def expand(tiles, Nq, Nk, block_m, block_n):
    """(..., nQ, nK) tile mask -> (..., Nq, Nk) entry mask."""
    rows = np.arange(Nq) // block_m
    cols = np.arange(Nk) // block_n
    return tiles[..., rows[:, None], cols[None, :]]


def scores(q, k, softmax_scale=None):
    """(B, Hq, Nq, Nk) float64 scaled scores, one head at a time (h reads kv head h // group)."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    B, Nq, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = 1 / math.sqrt(D) if softmax_scale is None else softmax_scale
    s = np.empty((B, Hq, Nq, k.shape[1]))
    for h in range(Hq):
        s[:, h] = scale * np.matmul(q[:, :, h, :], k[:, :, h // group, :].transpose(0, 2, 1))
    return s


def describe(p):
    note(f"problem: {p}")


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


@given(problems(), st.data())
def test_matches_online_softmax_loop(p, data):
    """The reference equals the tile-by-tile online-softmax loop: out, lse, keep and tile maxima."""
    describe(p)
    q, k, v = p.arrays()
    tile_max = R.block_max_scores(q, k, **p.kwargs())
    thr = draw_thresholds(data, tile_max, p.Hq, p.nQ)
    out, lse, keep = R.attention(q, k, v, thr, return_lse=True, return_keep=True, **p.kwargs())
    e_out, e_lse, e_keep, e_max = online_softmax_attention(q, k, v, thr, **p.kwargs())
    assert_close(tile_max, e_max, RTOL64, ATOL64, "block_max_scores vs loop tile max")
    assert_same_mask(keep, e_keep, "keep vs loop")
    assert_close(out, e_out, RTOL64, ATOL64, "out vs loop")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse vs loop")
    has_valid = np.isfinite(tile_max)
    event(f"skipped tiles: {'some' if (has_valid & ~keep).any() else 'none'}")
    event(f"empty rows: {'some' if np.isneginf(lse).any() else 'none'}")
    event(f"tiles per (b, h): {'<=16' if p.nQ * p.nK <= 16 else '<=128' if p.nQ * p.nK <= 128 else '>128'}")


@given(problems(), st.sampled_from(["none", "-inf", "-inf array"]))
def test_dense_equals_scipy_softmax(p, how):
    """thresholds=None (and -inf, which keeps everything) is plain masked softmax attention."""
    describe(p)
    q, k, v = p.arrays()
    thr = {"none": None, "-inf": -math.inf, "-inf array": np.full((p.Hq, 3), -np.inf, np.float32)}[how]
    out, lse, keep = R.attention(q, k, v, thr, return_lse=True, return_keep=True, **p.kwargs())
    e_out, e_lse = dense_softmax_attention(q, k, v, causal=p.causal, softmax_scale=p.softmax_scale)
    assert_close(out, e_out, RTOL64, ATOL64, "out vs scipy")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse vs scipy")
    has_valid = tile_has_valid(p.Nq, p.Nk, p.causal, p.block_m, p.block_n)
    assert_same_mask(keep, np.broadcast_to(has_valid, keep.shape), "dense keep = tiles with a valid entry")
    assert not np.isnan(out).any() and not np.isnan(lse).any()


@given(problems(), st.sampled_from(["scalar", "array", "float32 max"]))
def test_inf_threshold_keeps_exactly_diagonal(p, how):
    """+inf keeps exactly the diagonal tiles that have a valid entry; out is softmax over them."""
    describe(p)
    q, k, v = p.arrays()
    if how == "scalar":
        thr = math.inf
    elif how == "array":
        thr = np.full((p.Hq, p.nQ), np.inf, dtype=np.float32)
    else:  # a float64 value above float32's range rounds to +inf in float32
        thr = np.full((p.Hq, 1), 1e300)
    with np.errstate(over="ignore"):
        out, lse, keep = R.attention(q, k, v, thr, return_lse=True, return_keep=True, **p.kwargs())
    want = diagonal_table(p.Nq, p.Nk, p.block_m, p.block_n) & tile_has_valid(
        p.Nq, p.Nk, p.causal, p.block_m, p.block_n)
    assert_same_mask(keep, np.broadcast_to(want, keep.shape), "keep at +inf")
    allowed = np.broadcast_to(expand(want, p.Nq, p.Nk, p.block_m, p.block_n), (p.B, p.Hq, p.Nq, p.Nk))
    e_out, e_lse = dense_softmax_attention(q, k, v, causal=p.causal, softmax_scale=p.softmax_scale,
                                           allowed=allowed)
    assert_close(out, e_out, RTOL64, ATOL64, "out at +inf vs scipy on diagonal tiles")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse at +inf vs scipy on diagonal tiles")


@given(problems(), st.data())
def test_keep_is_gate_of_block_max_scores(p, data):
    """keep[b,h,a,c] = has valid entry and (diagonal or M >= float32 threshold at clamp(p(a)))."""
    describe(p)
    q, k, v = p.arrays()
    tile_max = R.block_max_scores(q, k, **p.kwargs())
    thr = draw_thresholds(data, tile_max, p.Hq, p.nQ, kinds=("scalar", "array"))
    keep = R.attention(q, k, v, thr, return_keep=True, **p.kwargs())[1]
    t32 = np.asarray(thr, dtype=np.float32)
    diag = diagonal_table(p.Nq, p.Nk, p.block_m, p.block_n)
    has_valid = tile_has_valid(p.Nq, p.Nk, p.causal, p.block_m, p.block_n)
    want = np.zeros_like(keep)
    for a in range(p.nQ):
        if t32.ndim == 0:
            t = np.full(p.Hq, float(t32))
        else:
            col = min(max(position_of(a, p.Nq, p.Nk, p.block_m), 0), t32.shape[1] - 1)
            t = t32[:, col].astype(np.float64)
        for c in range(p.nK):
            if has_valid[a, c]:
                want[:, :, a, c] = diag[a, c] | (tile_max[:, :, a, c] >= t[None, :])
    assert_same_mask(keep, want, "keep vs gate(block_max_scores)")
    assert (tile_max[:, :, ~has_valid] == -np.inf).all(), "tiles with no valid entry must have max -inf"
    assert np.isfinite(tile_max[:, :, has_valid]).all(), "tiles with a valid entry must have a finite max"


@given(problems(), st.data())
def test_raising_thresholds_never_adds_tiles(p, data):
    describe(p)
    q, k, v = p.arrays()
    tile_max = R.block_max_scores(q, k, **p.kwargs())
    thr = draw_thresholds(data, tile_max, p.Hq, p.nQ, kinds=("array",))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="delta seed"))
    delta = rng.exponential(0.5, size=thr.shape) * (rng.random(thr.shape) < 0.7)
    delta[rng.random(thr.shape) < 0.1] = np.inf
    with np.errstate(invalid="ignore"):
        thr_hi = np.where(delta == np.inf, np.inf, thr.astype(np.float64) + delta).astype(np.float32)
    assert (thr_hi >= thr).all()
    keep_lo = R.attention(q, k, v, thr, return_keep=True, **p.kwargs())[1]
    keep_hi = R.attention(q, k, v, thr_hi, return_keep=True, **p.kwargs())[1]
    added = keep_hi & ~keep_lo
    assert not added.any(), f"raising thresholds added {int(added.sum())} tiles, e.g. {np.argwhere(added)[:3]}"
    # and scalars
    t = float(thr.flat[0]) if np.isfinite(thr.flat[0]) else 0.0
    k1 = R.attention(q, k, v, t, return_keep=True, **p.kwargs())[1]
    k2 = R.attention(q, k, v, t + 0.25, return_keep=True, **p.kwargs())[1]
    assert not (k2 & ~k1).any()


@given(problems(), st.data())
def test_keep_replay_reproduces_out_and_lse(p, data):
    describe(p)
    q, k, v = p.arrays()
    tile_max = R.block_max_scores(q, k, **p.kwargs())
    thr = draw_thresholds(data, tile_max, p.Hq, p.nQ)
    out, lse, keep = R.attention(q, k, v, thr, return_lse=True, return_keep=True, **p.kwargs())
    r_out, r_lse, r_keep = R.attention(q, k, v, keep=keep, return_lse=True, return_keep=True, **p.kwargs())
    assert_same_mask(r_keep, keep, "replayed keep")
    assert_close(r_out, out, RTOL64, ATOL64, "replayed out")
    assert_close(r_lse, lse, RTOL64, ATOL64, "replayed lse")


@given(problems(max_n=200), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_keep_replay_of_arbitrary_mask(p, seed, density):
    """An arbitrary mask replays like the loop does; tiles with no valid entry are dropped."""
    describe(p)
    q, k, v = p.arrays()
    mask = np.random.default_rng(seed).random((p.B, p.Hq, p.nQ, p.nK)) < density
    out, lse, keep = R.attention(q, k, v, keep=mask, return_lse=True, return_keep=True, **p.kwargs())
    has_valid = tile_has_valid(p.Nq, p.Nk, p.causal, p.block_m, p.block_n)
    assert_same_mask(keep, mask & has_valid, "returned keep = given mask & tile has a valid entry")
    e_out, e_lse, e_keep, _ = online_softmax_attention(q, k, v, keep=mask, **p.kwargs())
    assert_close(out, e_out, RTOL64, ATOL64, "out vs loop (replayed mask)")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse vs loop (replayed mask)")
    allowed = expand(mask, p.Nq, p.Nk, p.block_m, p.block_n)
    d_out, d_lse = dense_softmax_attention(q, k, v, causal=p.causal, softmax_scale=p.softmax_scale,
                                           allowed=allowed)
    assert_close(out, d_out, RTOL64, ATOL64, "out vs scipy (replayed mask)")
    assert_close(lse, d_lse, RTOL64, ATOL64, "lse vs scipy (replayed mask)")


@given(problems(max_n=200), st.data())
def test_gqa_equals_explicit_repeat_and_per_head(p, data):
    """Grouped K/V equal explicitly repeated K/V, and each query head h equals a single-head run
    against kv head h // (Hq / Hkv)."""
    describe(p)
    q, k, v = p.arrays()
    tile_max = R.block_max_scores(q, k, **p.kwargs())
    thr = draw_thresholds(data, tile_max, p.Hq, p.nQ)
    out, lse, keep = R.attention(q, k, v, thr, return_lse=True, return_keep=True, **p.kwargs())
    group = p.Hq // p.Hkv
    idx = [h // group for h in range(p.Hq)]
    k_rep, v_rep = k[:, :, idx, :], v[:, :, idx, :]
    o2, l2, k2 = R.attention(q, k_rep, v_rep, thr, return_lse=True, return_keep=True, **p.kwargs())
    assert_close(o2, out, RTOL64, ATOL64, "out with repeated K/V")
    assert_close(l2, lse, RTOL64, ATOL64, "lse with repeated K/V")
    assert_same_mask(k2, keep, "keep with repeated K/V")
    for h in range(p.Hq):
        th = thr[h:h + 1] if isinstance(thr, np.ndarray) and thr.ndim == 2 else thr
        oh, lh, kh = R.attention(q[:, :, h:h + 1], k[:, :, idx[h]:idx[h] + 1], v[:, :, idx[h]:idx[h] + 1], th,
                                 return_lse=True, return_keep=True, **p.kwargs())
        assert_close(oh[:, :, 0], out[:, :, h], RTOL64, ATOL64, f"out head {h} alone")
        assert_close(lh[:, 0], lse[:, h], RTOL64, ATOL64, f"lse head {h} alone")
        assert_same_mask(kh[:, 0], keep[:, h], f"keep head {h} alone")


@given(problems(), st.data())
def test_lse_agrees_with_out(p, data):
    """Over the kept valid entries: sum exp(s - lse) == 1 and sum exp(s - lse) v == out; rows with
    nothing kept have lse = -inf and out = 0."""
    describe(p)
    q, k, v = p.arrays()
    tile_max = R.block_max_scores(q, k, **p.kwargs())
    thr = draw_thresholds(data, tile_max, p.Hq, p.nQ)
    out, lse, keep = R.attention(q, k, v, thr, return_lse=True, return_keep=True, **p.kwargs())
    assert out.dtype == np.float64 and lse.dtype == np.float64 and keep.dtype == np.bool_
    s = scores(q, k, p.softmax_scale)
    entries = valid_entries(p.Nq, p.Nk, p.causal) & expand(keep, p.Nq, p.Nk, p.block_m, p.block_n)
    empty = ~entries.any(axis=-1)  # (B, Hq, Nq)
    assert (lse[empty] == -np.inf).all(), "rows with nothing kept must have lse = -inf"
    assert np.isfinite(lse[~empty]).all(), "rows with a kept entry must have a finite lse"
    out_bh = out.transpose(0, 2, 1, 3)  # (B, Hq, Nq, D)
    assert (out_bh[empty] == 0).all(), "rows with nothing kept must have out = 0"
    safe_lse = np.where(empty, 0.0, lse)
    w = np.where(entries, np.exp(np.where(entries, s, 0.0) - safe_lse[..., None]), 0.0)
    assert_close(w.sum(-1)[~empty], np.ones(int((~empty).sum())), 1e-10, 1e-10, "sum exp(s - lse)")
    group = p.Hq // p.Hkv
    vh = v.astype(np.float64)[:, :, [h // group for h in range(p.Hq)], :].transpose(0, 2, 1, 3)
    assert_close(np.matmul(w, vh), out_bh, RTOL64, ATOL64, "sum exp(s - lse) v vs out")


@given(problems(max_n=200), st.floats(-3, 3), st.integers(1, 6))
def test_scalar_threshold_equals_broadcast_array(p, t, T):
    describe(p)
    q, k, v = p.arrays()
    ref = R.attention(q, k, v, np.full((p.Hq, T), np.float32(t)), return_lse=True, return_keep=True,
                      **p.kwargs())
    for wrapped in (t, np.float32(t), np.float64(t), np.array(t), np.array(t, dtype=np.float32)):
        got = R.attention(q, k, v, wrapped, return_lse=True, return_keep=True, **p.kwargs())
        what = f"scalar {type(wrapped).__name__} {t!r}"
        assert_same_mask(got[2], ref[2], f"keep, {what}")
        assert_close(got[0], ref[0], 0, 0, f"out, {what}")
        assert_close(got[1], ref[1], 0, 0, f"lse, {what}")


@given(problems(max_n=160, dtypes=(np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))),
       st.data())
def test_low_precision_inputs_are_computed_in_float64(p, data):
    """Half/bfloat16/float32 inputs give exactly the float64 result of the upcast inputs."""
    describe(p)
    q, k, v = p.arrays()
    tile_max = R.block_max_scores(q, k, **p.kwargs())
    assert tile_max.dtype == np.float64
    thr = draw_thresholds(data, tile_max, p.Hq, p.nQ)
    got = R.attention(q, k, v, thr, return_lse=True, return_keep=True, **p.kwargs())
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    want = R.attention(q64, k64, v64, thr, return_lse=True, return_keep=True, **p.kwargs())
    assert got[0].dtype == np.float64 and got[1].dtype == np.float64
    assert_same_mask(got[2], want[2], "keep")
    assert_close(got[0], want[0], 0, 0, "out")
    assert_close(got[1], want[1], 0, 0, "lse")
    assert_close(tile_max, R.block_max_scores(q64, k64, **p.kwargs()), 0, 0, "tile max")


# ---------------------------------------------------------------------------------------------
# return conventions
# ---------------------------------------------------------------------------------------------


def test_return_conventions_and_shapes():
    q, k, v = make_qkv(2, 70, 90, 4, 2, 16, seed=1)
    out = R.attention(q, k, v, block_m=32, block_n=16)
    assert isinstance(out, np.ndarray) and out.shape == (2, 70, 4, 16) and out.dtype == np.float64
    out2, lse = R.attention(q, k, v, block_m=32, block_n=16, return_lse=True)
    assert lse.shape == (2, 4, 70) and lse.dtype == np.float64
    out3, keep = R.attention(q, k, v, block_m=32, block_n=16, return_keep=True)
    assert keep.shape == (2, 4, 3, 6) and keep.dtype == np.bool_
    out4, lse4, keep4 = R.attention(q, k, v, block_m=32, block_n=16, return_lse=True, return_keep=True)
    for o in (out2, out3, out4):
        assert_close(o, out, 0, 0, "out across return flags")
    assert_close(lse4, lse, 0, 0, "lse across return flags")
    assert_same_mask(keep4, keep, "keep across return flags")
    tm = R.block_max_scores(q, k, block_m=32, block_n=16)
    assert tm.shape == (2, 4, 3, 6) and tm.dtype == np.float64


def test_defaults_are_causal_128x64_and_inv_sqrt_d():
    q, k, v = make_qkv(1, 300, 200, 2, 1, 32, seed=2)
    explicit = R.attention(q, k, v, 0.1, causal=True, softmax_scale=1 / math.sqrt(32), block_m=128,
                           block_n=64, return_lse=True, return_keep=True)
    default = R.attention(q, k, v, 0.1, return_lse=True, return_keep=True)
    assert default[2].shape == (1, 2, 3, 4)
    assert_same_mask(default[2], explicit[2], "keep, defaults")
    assert_close(default[0], explicit[0], 0, 0, "out, defaults")
    assert_close(default[1], explicit[1], 0, 0, "lse, defaults")
    assert_close(R.block_max_scores(q, k), R.block_max_scores(q, k, causal=True, softmax_scale=1 / math.sqrt(32),
                                                              block_m=128, block_n=64), 0, 0, "tile max, defaults")
    assert R.BLOCK_M == 128 and R.BLOCK_N == 64


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Nq,Nk", [(5, 2), (300, 100), (129, 1), (200, 64)])
@pytest.mark.parametrize("thr", [None, 0.0, math.inf])
def test_causal_rows_without_valid_key(Nq, Nk, thr):
    """Nq > Nk causal: the first Nq - Nk rows see no key: out 0, lse -inf, no NaN, no warning."""
    q, k, v = make_qkv(2, Nq, Nk, 2, 1, 16, seed=Nq + Nk)
    with np.errstate(all="raise"):
        out, lse, keep = R.attention(q, k, v, thr, return_lse=True, return_keep=True)
    dead = Nq - Nk
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert (out[:, :dead] == 0).all()
    assert (lse[:, :, :dead] == -np.inf).all()
    assert np.isfinite(lse[:, :, dead:]).all(), "rows with a valid key keep at least their diagonal"
    e_out, e_lse, e_keep, _ = online_softmax_attention(q, k, v, thr)
    assert_same_mask(keep, e_keep, "keep")
    assert_close(out, e_out, RTOL64, ATOL64, "out")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse")
    tm = R.block_max_scores(q, k)
    has_valid = tile_has_valid(Nq, Nk, True, 128, 64)
    assert (tm[:, :, ~has_valid] == -np.inf).all()
    assert not keep[:, :, ~has_valid].any()


def test_docstring_masks():
    assert_same_mask(R.valid_mask(2, 5, True), np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool), "2x5")
    assert_same_mask(R.valid_mask(5, 2, True), np.array([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]], bool), "5x2")
    assert R.valid_mask(3, 4, False).all() and R.valid_mask(3, 4, False).shape == (3, 4)


@pytest.mark.parametrize("Nq", [1, 10, 63, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_short_key_sequence(Nq, causal):
    """Nk < 64: a single (partial) key tile, always diagonal, so thresholds change nothing."""
    q, k, v = make_qkv(1, Nq, 40, 4, 2, 64, seed=Nq)
    dense = R.attention(q, k, v, causal=causal, return_lse=True)
    e_out, e_lse = dense_softmax_attention(q, k, v, causal=causal)
    assert_close(dense[0], e_out, RTOL64, ATOL64, "out vs scipy")
    assert_close(dense[1], e_lse, RTOL64, ATOL64, "lse vs scipy")
    sparse = R.attention(q, k, v, math.inf, causal=causal, return_lse=True, return_keep=True)
    assert sparse[2].shape == (1, 4, 1, 1) and sparse[2].all()
    assert_close(sparse[0], dense[0], 0, 0, "out at +inf")


@pytest.mark.parametrize("causal", [True, False])
def test_single_query(causal):
    """Nq = 1 is the last position: with causal it sees every key. At +inf only the diagonal tile
    (the one holding key Nk - 1) is kept."""
    Nk = 200
    q, k, v = make_qkv(1, 1, Nk, 2, 2, 32, seed=3)
    out, lse, keep = R.attention(q, k, v, causal=causal, return_lse=True, return_keep=True)
    assert keep.shape == (1, 2, 1, 4) and keep.all()
    e_out, e_lse = dense_softmax_attention(q, k, v, causal=False)  # the single row sees all keys
    assert_close(out, e_out, RTOL64, ATOL64, "out dense")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse dense")
    out, lse, keep = R.attention(q, k, v, math.inf, causal=causal, return_lse=True, return_keep=True)
    assert_same_mask(keep[0, 0, 0], np.array([False, False, False, True]), "keep at +inf")
    e_out, e_lse = dense_softmax_attention(q[:, :, :, :], k[:, 192:], v[:, 192:], causal=False)
    assert_close(out, e_out, RTOL64, ATOL64, "out diagonal only")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse diagonal only")


def test_single_key():
    """Nk = 1, causal: only the last query row is valid; it returns v[0] with lse = s."""
    q, k, v = make_qkv(1, 5, 1, 2, 1, 8, seed=4)
    out, lse, keep = R.attention(q, k, v, 3.0, return_lse=True, return_keep=True, block_m=2, block_n=1)
    assert (out[0, :4] == 0).all() and (lse[0, :, :4] == -np.inf).all()
    for h in range(2):
        assert_close(out[0, 4, h], v[0, 0, 0], RTOL64, ATOL64, "out last row = v")
        assert_close(lse[0, h, 4], q[0, 4, h] @ k[0, 0, 0] / math.sqrt(8), RTOL64, ATOL64, "lse = s")
    assert_same_mask(keep[0, 0], np.array([[False], [False], [True]]), "keep")
    out_nc = R.attention(q, k, v, causal=False)
    assert_close(out_nc[0], np.broadcast_to(v[0, 0, 0], (5, 2, 8)), RTOL64, ATOL64, "non-causal: every row = v")


def test_block_1x1_gates_single_entries():
    """block_m = block_n = 1 makes every score its own tile: entry (i, j) is kept iff it is valid
    and (j is row i's aligned diagonal or s >= threshold)."""
    Nq, Nk = 6, 9
    q, k, v = make_qkv(1, Nq, Nk, 1, 1, 4, seed=5)
    s = scores(q, k)[0, 0]
    t = float(np.float32(np.median(s)))
    out, lse, keep = R.attention(q, k, v, t, block_m=1, block_n=1, return_lse=True, return_keep=True)
    valid = valid_entries(Nq, Nk, True)
    diag = np.zeros((Nq, Nk), bool)
    diag[np.arange(Nq), np.arange(Nq) + Nk - Nq] = True
    want = valid & (diag | (s >= t))
    assert_same_mask(keep[0, 0], want, "1x1 keep")
    e_out, e_lse = dense_softmax_attention(q, k, v, allowed=want[None, None])
    assert_close(out, e_out, RTOL64, ATOL64, "1x1 out")
    assert_close(lse, e_lse, RTOL64, ATOL64, "1x1 lse")


@pytest.mark.parametrize("Nq,Nk,T,columns", [
    (512, 512, 2, [0, 1, 1, 1]),  # positions 0..3, T = 2: positions past T use column T - 1
    (512, 256, 3, [0, 0, 0, 1]),  # positions -2, -1, 0, 1: negative ones use column 0
    (100, 300, 3, [1]),           # position 1
    (300, 100, 5, [0, 0, 0]),     # positions -2, -1, 0
    (200, 520, 8, [2, 3]),        # positions 320 // 128 = 2 and 448 // 128 = 3
    (200, 520, 3, [2, 2]),
])
def test_threshold_table_clamping(Nq, Nk, T, columns):
    """thresholds[h, clamp(p(a), 0, T - 1)]: compare with the equivalent full (Hq, nQ) table."""
    assert columns == [min(max(position_of(a, Nq, Nk, 128), 0), T - 1) for a in range(-(-Nq // 128))]
    q, k, v = make_qkv(1, Nq, Nk, 2, 1, 16, seed=T, spread=3.0)
    tm = R.block_max_scores(q, k)
    rng = np.random.default_rng(T)
    finite = tm[np.isfinite(tm)]
    table = rng.uniform(finite.min(), finite.max(), size=(2, T)).astype(np.float32)
    got_out, got_lse, got_keep = R.attention(q, k, v, table, return_lse=True, return_keep=True)
    # expected: query tile a gated with table[:, columns[a]]
    diag = diagonal_table(Nq, Nk, 128, 64)
    has_valid = tile_has_valid(Nq, Nk, True, 128, 64)
    want = np.zeros_like(got_keep)
    for a, col in enumerate(columns):
        want[:, :, a] = has_valid[a] & (diag[a] | (tm[:, :, a] >= table[:, col].astype(np.float64)[None, :, None]))
    assert_same_mask(got_keep, want, "keep, short table")
    e_out, e_lse, e_keep, _ = online_softmax_attention(q, k, v, table)
    assert_same_mask(e_keep, want, "loop keep, short table")
    assert_close(got_out, e_out, RTOL64, ATOL64, "out, short table")
    assert_close(got_lse, e_lse, RTOL64, ATOL64, "lse, short table")


@pytest.mark.parametrize("Nq,Nk,block_m,positions", [
    (256, 256, 128, [0, 1]),
    (100, 300, 128, [1]),
    (300, 100, 128, [-2, -1, 0]),
    (200, 520, 128, [2, 3]),
    (512, 256, 128, [-2, -1, 0, 1]),
    (40, 100, 16, [3, 4, 5]),
    (1, 1000, 128, [7]),
])
def test_tile_positions(Nq, Nk, block_m, positions):
    got = R.tile_positions(Nq, Nk, block_m)
    assert list(got) == positions
    assert [position_of(a, Nq, Nk, block_m) for a in range(len(positions))] == positions


def test_threshold_position_is_used():
    """Nq=100, Nk=300: the only query tile sits at position 1, so only column 1 matters."""
    q, k, v = make_qkv(1, 100, 300, 2, 1, 16, seed=6)
    all_keep = R.attention(q, k, v, np.array([[np.inf, -np.inf, np.inf]] * 2, np.float32), return_keep=True)[1]
    assert all_keep.all(), "column 1 = -inf keeps every tile (all have valid entries here)"
    diag_only = R.attention(q, k, v, np.array([[-np.inf, np.inf, -np.inf]] * 2, np.float32), return_keep=True)[1]
    assert_same_mask(diag_only[0, 0, 0], np.array([False, False, False, True, True]), "column 1 = +inf")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk,block_m,block_n,expected", [
    (256, 256, 128, 64, [{0, 1}, {2, 3}]),
    (100, 300, 128, 64, [{3, 4}]),              # span [200, 299]
    (300, 100, 128, 64, [{0}, {0}, {0, 1}]),    # spans clip to [0, 0], [0, 55], [56, 99]
    (1, 200, 128, 64, [{3}]),                   # span [199, 199]
    (40, 40, 16, 8, [{0, 1}, {2, 3}, {4}]),
    (130, 70, 128, 64, [{0, 1}, {1}]),          # spans [-60, 67] -> [0, 67]; [68, 69]
])
def test_diagonal_tiles(causal, Nq, Nk, block_m, block_n, expected):
    nK = -(-Nk // block_n)
    want = np.array([[c in e for c in range(nK)] for e in expected], dtype=bool)
    assert_same_mask(R.diagonal_tiles(Nq, Nk, block_m, block_n), want, "diagonal_tiles")
    assert_same_mask(diagonal_table(Nq, Nk, block_m, block_n), want, "independent diagonal table")
    # at +inf exactly the diagonal tiles with a valid entry are kept, causal or not
    q, k, v = make_qkv(1, Nq, Nk, 1, 1, 8, seed=7)
    keep = R.attention(q, k, v, math.inf, causal=causal, block_m=block_m, block_n=block_n, return_keep=True)[1]
    assert_same_mask(keep[0, 0], want & tile_has_valid(Nq, Nk, causal, block_m, block_n), "keep at +inf")


def _one_far_tile(M):
    """Nq = 1, Nk = 128, D = 1, scale 1: key tile 1 is diagonal; key tile 0 is not and its maximum
    is exactly M (key 0 = M, the rest -5)."""
    q = np.ones((1, 1, 1, 1))
    k = np.full((1, 128, 1, 1), -5.0)
    k[0, 0, 0, 0] = M
    k[0, 64:, 0, 0] = 0.0
    v = np.random.default_rng(0).standard_normal((1, 128, 1, 1))
    return q, k, v


def _far_tile_kept(M, thr):
    q, k, v = _one_far_tile(M)
    assert R.block_max_scores(q, k, softmax_scale=1.0)[0, 0, 0, 0] == M
    keep = R.attention(q, k, v, thr, softmax_scale=1.0, return_keep=True)[1]
    assert keep[0, 0, 0, 1], "the diagonal tile is always kept"
    return bool(keep[0, 0, 0, 0])


def test_threshold_tie_keeps_and_strictly_below_skips():
    assert _far_tile_kept(0.5, 0.5), "M == threshold is kept (skipped iff M < threshold)"
    assert _far_tile_kept(0.5, np.array([[0.5]], np.float32))
    above = float(np.nextafter(np.float32(0.5), np.float32(1)))
    assert not _far_tile_kept(0.5, above)
    assert not _far_tile_kept(0.5, np.array([[above]], np.float32))
    assert _far_tile_kept(0.5, -math.inf) and not _far_tile_kept(0.5, math.inf)


def test_threshold_is_rounded_to_float32():
    """Thresholds are float32: 0.5 + 1e-12 rounds to 0.5 (tile with M = 0.5 kept), and 0.1 rounds
    up to float32(0.1) > 0.1 + 1e-12 (tile with that M skipped)."""
    assert _far_tile_kept(0.5, 0.5 + 1e-12)
    assert _far_tile_kept(0.5, np.array([[0.5 + 1e-12]]))  # float64 table, cast to float32
    M = 0.1 + 1e-12
    assert M < float(np.float32(0.1))
    assert not _far_tile_kept(M, 0.1)
    assert not _far_tile_kept(M, np.float64(0.1))
    assert _far_tile_kept(M, float(np.nextafter(np.float32(0.1), np.float32(0))))


def test_non_causal_nq_greater_than_nk_every_row_attends():
    q, k, v = make_qkv(1, 300, 50, 2, 2, 16, seed=8)
    out, lse = R.attention(q, k, v, causal=False, return_lse=True)
    assert np.isfinite(lse).all()
    e_out, e_lse = dense_softmax_attention(q, k, v, causal=False)
    assert_close(out, e_out, RTOL64, ATOL64, "out")
    assert_close(lse, e_lse, RTOL64, ATOL64, "lse")


def test_large_scores_are_stable():
    """Scores around +-1e3 neither overflow nor lose the softmax (shift by the row maximum)."""
    q, k, v = make_qkv(1, 70, 90, 1, 1, 8, seed=9)
    out, lse = R.attention(q * 40, k * 40, v, softmax_scale=1.0, block_m=16, block_n=8, return_lse=True)
    e_out, e_lse = dense_softmax_attention(q * 40, k * 40, v, softmax_scale=1.0)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert_close(out, e_out, 1e-9, 1e-9, "out")
    assert_close(lse, e_lse, 1e-12, 1e-9, "lse")
