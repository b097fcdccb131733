"""Explicit absolute positions (q_start / k_start) and merge_partials: split calls merged by LSE
reproduce the unsplit call, and the default offsets are the bottom-right geometry as before."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

import bsfa_reference as R
from tests.support.reference_helpers import assert_close, assert_same_mask, draw_thresholds, make_qkv

#: merging rounds in float64 on top of each part's own rounding
RTOL_MERGE = 1e-12
ATOL_MERGE = 1e-12
#: scores of a part and of the full call come from different GEMM shapes, whose float64 rounding
#: (BLAS edge kernels) may differ in the last bits
RTOL_SCORES = 1e-13
ATOL_SCORES = 1e-13


def n_tiles(n, block):
    return -(-n // block)


def split_call(q, k, v, thresholds, q_cuts, k_cuts, *, causal, block_m=128, block_n=64, prefix=0):
    """The full call rebuilt from one call per (query part, key part) pair.

    ``prefix`` = Nk - Nq of the full call (a multiple of block_m): its queries start there.

    Returns out, lse merged with merge_partials, keep and block maxima placed at the parts'
    absolute tile positions (each tile of the full problem written exactly once).
    """
    B, N, Hq, D = q.shape
    assert k.shape[1] - N == prefix
    out = np.full((B, N, Hq, D), np.nan)
    lse = np.full((B, Hq, N), np.nan)
    keep = np.zeros((B, Hq, n_tiles(N, block_m), n_tiles(k.shape[1], block_n)), dtype=bool)
    written = np.zeros(keep.shape[2:], dtype=int)
    tile_max = np.full(keep.shape, np.nan)
    for q0, q1 in zip(q_cuts, q_cuts[1:]):
        outs, lses = [], []
        for k0, k1 in zip(k_cuts, k_cuts[1:]):
            kw = dict(causal=causal, block_m=block_m, block_n=block_n, q_start=prefix + q0, k_start=k0)
            o, l, t = R.attention(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], thresholds, return_lse=True,
                                  return_keep=True, **kw)
            m = R.block_max_scores(q[:, q0:q1], k[:, k0:k1], **kw)
            at = np.s_[q0 // block_m:q0 // block_m + t.shape[2], k0 // block_n:k0 // block_n + t.shape[3]]
            keep[:, :, at[0], at[1]] = t
            tile_max[:, :, at[0], at[1]] = m
            written[at] += 1
            outs.append(o)
            lses.append(l)
        out[:, q0:q1], lse[:, :, q0:q1] = R.merge_partials(outs, lses)
    assert (written == 1).all(), "the parts' tiles must tile the full problem exactly once"
    return out, lse, keep, tile_max


def draw_cuts(data, n, block, label):
    """0, n and tile boundaries in between: none, every one (single-tile parts) or 1 to 4 at random."""
    inner = list(range(block, n, block))
    kind = data.draw(st.sampled_from(["random", "random", "every", "none"]), label=f"{label} kind")
    if kind == "every" and len(inner) <= 12:
        chosen = inner
    elif kind == "none" or not inner:
        chosen = []
    else:  # seeded rather than drawn: hypothesis would favour the empty list
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label=f"{label} seed"))
        chosen = rng.choice(inner, size=min(len(inner), int(rng.integers(1, 5))), replace=False).tolist()
    return [0] + sorted(chosen) + [n]


def assert_split_equals_full(q, k, v, thresholds, q_cuts, k_cuts, *, causal, block_m=128, block_n=64, prefix=0):
    full_out, full_lse, full_keep = R.attention(q, k, v, thresholds, causal=causal, block_m=block_m,
                                                block_n=block_n, return_lse=True, return_keep=True)
    full_max = R.block_max_scores(q, k, causal=causal, block_m=block_m, block_n=block_n)
    out, lse, keep, tile_max = split_call(q, k, v, thresholds, q_cuts, k_cuts, causal=causal, block_m=block_m,
                                          block_n=block_n, prefix=prefix)
    assert_same_mask(keep, full_keep, "keep of the parts vs the full call")
    assert_same_mask(np.isneginf(tile_max), np.isneginf(full_max), "tiles without a valid entry")
    assert_close(tile_max, full_max, RTOL_SCORES, ATOL_SCORES, "block maxima of the parts vs the full call")
    assert_close(lse, full_lse, RTOL_MERGE, ATOL_MERGE, "merged lse vs the full call")
    assert_close(out, full_out, RTOL_MERGE, ATOL_MERGE, "merged out vs the full call")
    return full_keep


# ---------------------------------------------------------------------------------------------
# the point of the feature: split calls merged by LSE are the full call
# ---------------------------------------------------------------------------------------------


@given(data=st.data())
def test_split_calls_merge_to_the_full_call(data):
    block_m, block_n = data.draw(st.sampled_from([(128, 64), (128, 64), (16, 8), (32, 16)]), label="tiles")
    N = data.draw(st.integers(1, 700) | st.integers(300, 700), label="N")
    group = data.draw(st.sampled_from([1, 2, 4]), label="group")
    Hkv = data.draw(st.integers(1, 2), label="Hkv")
    D = data.draw(st.sampled_from([8, 16]), label="D")
    causal = data.draw(st.booleans(), label="causal")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    Hq = Hkv * group
    q, k, v = make_qkv(1, N, N, Hq, Hkv, D, seed=seed, spread=3.0)
    thresholds = draw_thresholds(data, R.block_max_scores(q, k, causal=causal, block_m=block_m, block_n=block_n),
                                 Hq, n_tiles(N, block_m))
    q_cuts = draw_cuts(data, N, block_m, "query cuts")
    k_cuts = draw_cuts(data, N, block_n, "key cuts")
    note(f"N={N} Hq={Hq} Hkv={Hkv} causal={causal} tiles={block_m}x{block_n} q_cuts={q_cuts} k_cuts={k_cuts}")
    event(f"{len(q_cuts) - 1} x {len(k_cuts) - 1} parts")
    keep = assert_split_equals_full(q, k, v, thresholds, q_cuts, k_cuts, causal=causal, block_m=block_m,
                                    block_n=block_n)
    event("some tiles skipped" if not keep.all() else "every tile kept")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("thresholds", [None, "median", "table"])
def test_one_tile_per_part(causal, thresholds):
    """Every part a single tile, the last ones ragged: 3 x 5 calls for N = 300."""
    N, Hq = 300, 4
    q, k, v = make_qkv(2, N, N, Hq, 2, 16, seed=3, spread=3.0)
    tm = R.block_max_scores(q, k, causal=causal)
    levels = np.quantile(tm[np.isfinite(tm)], np.linspace(0.1, 0.9, Hq * 4))
    if thresholds == "median":
        thresholds = float(np.median(tm[np.isfinite(tm)]))
    elif thresholds == "table":
        thresholds = levels.astype(np.float32).reshape(Hq, 4)
    keep = assert_split_equals_full(q, k, v, thresholds, [0, 128, 256, N], list(range(0, N, 64)) + [N],
                                    causal=causal)
    if thresholds is not None:
        assert not keep.all(), "thresholds this high must skip some tiles"


@pytest.mark.parametrize("causal", [True, False])
def test_split_of_a_call_after_an_aligned_prefix(causal):
    """Queries after 256 cached keys (Nk - Nq a multiple of block_m): q_start = 256 + cut."""
    q, k, v = make_qkv(1, 200, 456, 4, 1, 8, seed=8, spread=3.0)
    tm = R.block_max_scores(q, k, causal=causal)
    levels = np.quantile(tm[np.isfinite(tm)], [0.2, 0.4, 0.5, 0.6, 0.8])
    for thresholds in (None, float(levels[2]), np.tile(levels.astype(np.float32), (4, 1))):
        keep = assert_split_equals_full(q, k, v, thresholds, [0, 128, 200], [0, 64, 320, 384, 456], causal=causal,
                                        prefix=256)
        assert thresholds is None or not keep[..., :4].all(), "thresholds this high must skip some tiles"


def test_split_keeps_nonfinite_rules():
    """A NaN query row and an inf value: the parts' NaN patterns merge to the full call's."""
    N = 400
    q, k, v = make_qkv(1, N, N, 2, 1, 8, seed=5, spread=3.0)
    q[0, 150, 1, 3] = np.nan
    v[0, 70, 0, 2] = np.inf
    for thresholds in (None, 0.8):
        out, lse, keep, _ = split_call(q, k, v, thresholds, [0, 128, 384, N], [0, 64, 192, N], causal=True)
        f_out, f_lse, f_keep = R.attention(q, k, v, thresholds, return_lse=True, return_keep=True)
        assert_same_mask(keep, f_keep, "keep")
        assert np.isnan(f_lse).any() and np.isnan(f_out).any()
        assert_close(lse, f_lse, RTOL_MERGE, ATOL_MERGE, "lse with a NaN query row")
        assert_close(out, f_out, RTOL_MERGE, ATOL_MERGE, "out with a NaN query row and an inf value")


def test_key_part_after_a_causal_query_part_is_empty():
    q, k, v = make_qkv(1, 128, 64, 2, 2, 8, seed=1)
    out, lse, keep = R.attention(q, k, v, -math.inf, q_start=128, k_start=256, return_lse=True, return_keep=True)
    assert (out == 0).all() and np.isneginf(lse).all() and not keep.any()
    assert np.isneginf(R.block_max_scores(q, k, q_start=128, k_start=256)).all()
    non_causal = R.attention(q, k, v, causal=False, q_start=128, k_start=256, return_keep=True)[1]
    assert non_causal.all(), "non-causal, every pair is valid wherever the parts sit"


# ---------------------------------------------------------------------------------------------
# the default offsets are today's bottom-right geometry
# ---------------------------------------------------------------------------------------------


def todays_diagonal(Nq, Nk, block_m, block_n):
    """The bottom-right rule as written before offsets existed: span clipped into [0, Nk - 1]."""
    diag = np.zeros((n_tiles(Nq, block_m), n_tiles(Nk, block_n)), dtype=bool)
    for a in range(diag.shape[0]):
        lo = min(max(a * block_m + Nk - Nq, 0), Nk - 1)
        hi = min(max(min((a + 1) * block_m, Nq) - 1 + Nk - Nq, 0), Nk - 1)
        diag[a, lo // block_n:hi // block_n + 1] = True
    return diag


SIZES = [1, 2, 7, 63, 64, 65, 127, 128, 129, 200, 256, 300, 385, 520]


@pytest.mark.parametrize("block_m,block_n", [(128, 64), (16, 8), (64, 128), (5, 3)])
def test_default_offsets_give_todays_geometry(block_m, block_n):
    for Nq in SIZES:
        for Nk in SIZES:
            i, j = np.arange(Nq)[:, None], np.arange(Nk)[None, :]
            assert_same_mask(R.valid_mask(Nq, Nk, True), j <= i + Nk - Nq, f"mask {Nq}x{Nk}")
            assert_same_mask(R.diagonal_tiles(Nq, Nk, block_m, block_n), todays_diagonal(Nq, Nk, block_m, block_n),
                             f"diagonal {Nq}x{Nk}")
            want = [(a * block_m + Nk - Nq) // block_m for a in range(n_tiles(Nq, block_m))]
            assert R.tile_positions(Nq, Nk, block_m).tolist() == want, (Nq, Nk)


@pytest.mark.parametrize("Nq,Nk", [(128, 384), (50, 306), (300, 300), (256, 512)])
@pytest.mark.parametrize("causal", [True, False])
def test_explicit_bottom_right_offsets_equal_the_default(Nq, Nk, causal):
    q, k, v = make_qkv(1, Nq, Nk, 4, 2, 16, seed=Nq + Nk, spread=3.0)
    table = np.linspace(0.0, 1.2, 4 * 6, dtype=np.float32).reshape(4, 6)
    for thresholds in (None, 0.6, table):
        want = R.attention(q, k, v, thresholds, causal=causal, return_lse=True, return_keep=True)
        got = R.attention(q, k, v, thresholds, causal=causal, q_start=Nk - Nq, return_lse=True, return_keep=True)
        for g, w, name in zip(got, want, ("out", "lse", "keep")):
            assert np.array_equal(g, w, equal_nan=name != "keep"), name
    assert np.array_equal(R.block_max_scores(q, k, causal=causal, q_start=Nk - Nq),
                          R.block_max_scores(q, k, causal=causal))


@pytest.mark.parametrize("Nq,Nk", [(100, 300), (300, 100), (128, 64)])
def test_shifting_both_offsets_changes_only_threshold_positions(Nq, Nk):
    """Default q_start follows k_start; with a scalar threshold nothing else can change."""
    q, k, v = make_qkv(1, Nq, Nk, 2, 1, 8, seed=9, spread=3.0)
    base = R.attention(q, k, v, 0.7, return_lse=True, return_keep=True)
    for k_start in (256, 1024):
        shifted = R.attention(q, k, v, 0.7, k_start=k_start, return_lse=True, return_keep=True)
        for g, w in zip(shifted, base):
            assert np.array_equal(g, w, equal_nan=True)
    if Nk >= Nq:  # bottom-right then starts at a non-negative position, but not on a tile boundary
        assert R.tile_positions(Nq, Nk, 128, k_start=256).tolist() == (R.tile_positions(Nq, Nk, 128) + 2).tolist()


# ---------------------------------------------------------------------------------------------
# the rules inside one part, by hand
# ---------------------------------------------------------------------------------------------


def test_threshold_positions_of_a_part():
    assert R.tile_positions(200, 64, 128, q_start=256).tolist() == [2, 3]
    assert R.tile_positions(200, 64, 128, q_start=256, k_start=4096).tolist() == [2, 3]
    assert R.tile_positions(40, 8, 16, q_start=32).tolist() == [2, 3, 4]
    assert R.tile_positions(1, 1000, 128, q_start=0).tolist() == [0]


@pytest.mark.parametrize("Nq,Nk,q_start,k_start,expected", [
    (256, 192, 256, 0, [set(), set()]),            # spans [256, 383], [384, 511]; keys [0, 191]
    (256, 128, 256, 256, [{0, 1}, set()]),          # keys [256, 383]
    (256, 128, 256, 320, [{0}, {1}]),               # keys [320, 447]
    (44, 108, 256, 192, [{1}]),                     # span [256, 299]; keys [192, 255], [256, 299]
    (128, 64, 0, 512, [set()]),                     # the keys lie after the span
    (300, 64, 0, 64, [{0}, set(), set()]),          # only the first span reaches keys [64, 127]
])
def test_diagonal_tiles_of_a_part(Nq, Nk, q_start, k_start, expected):
    nK = n_tiles(Nk, 64)
    want = np.array([[c in e for c in range(nK)] for e in expected], dtype=bool)
    assert_same_mask(R.diagonal_tiles(Nq, Nk, 128, 64, q_start=q_start, k_start=k_start), want, "diagonal")
    # at +inf exactly the diagonal tiles with a valid entry are kept
    q, k, v = make_qkv(1, Nq, Nk, 1, 1, 8, seed=2)
    for causal in (True, False):
        keep = R.attention(q, k, v, math.inf, causal=causal, q_start=q_start, k_start=k_start, return_keep=True)[1]
        valid = R.valid_mask(Nq, Nk, causal, q_start=q_start, k_start=k_start)
        has_valid = np.array([[valid[a * 128:(a + 1) * 128, c * 64:(c + 1) * 64].any() for c in range(nK)]
                              for a in range(len(expected))])
        assert_same_mask(keep[0, 0], want & has_valid, f"keep at +inf, causal={causal}")


def test_valid_mask_of_a_part():
    got = R.valid_mask(3, 4, True, q_start=128, k_start=126)  # rows 128..130, keys 126..129
    want = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)
    assert_same_mask(got, want, "mask")
    assert R.valid_mask(3, 4, False, q_start=0, k_start=640).all()


def test_threshold_column_of_a_part_is_used():
    """Query part at 256: its one tile sits at position 2, so only column 2 matters."""
    q, k, v = make_qkv(1, 100, 320, 2, 1, 16, seed=6)
    kw = dict(q_start=256, k_start=0, return_keep=True)
    cols = lambda c2, other: np.array([[other, other, c2, other]] * 2, np.float32)  # noqa: E731
    keep = R.attention(q, k, v, cols(-np.inf, np.inf), **kw)[1]
    assert keep[0, 0, 0].tolist() == [True] * 5, "column 2 = -inf keeps every valid tile"
    keep = R.attention(q, k, v, cols(np.inf, -np.inf), **kw)[1]
    assert keep[0, 0, 0].tolist() == [False, False, False, False, True], "column 2 = +inf: the diagonal only"


def test_gate_with_offsets_matches_attention():
    q, k, v = make_qkv(1, 200, 192, 2, 1, 8, seed=4, spread=3.0)
    kw = dict(q_start=256, k_start=128)
    tm = R.block_max_scores(q, k, **kw)
    table = np.array([[0.1, 0.4, 0.9, 1.3, 0.2]] * 2, np.float32)
    keep = R.attention(q, k, v, table, return_keep=True, **kw)[1]
    assert_same_mask(R.gate(tm, table, 200, 192, 128, 64, causal=True, **kw), keep, "gate vs attention")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,error,message", [
    (dict(q_start=100), ValueError, "q_start: expected a multiple of block_m = 128 .*got 100"),
    (dict(k_start=32), ValueError, "k_start: expected a multiple of block_n = 64 .*got 32"),
    (dict(q_start=-128), ValueError, "q_start: expected an int >= 0, got -128"),
    (dict(k_start=-64), ValueError, "k_start: expected an int >= 0, got -64"),
    (dict(q_start=128.0), TypeError, "q_start: expected an int >= 0 or None, got float 128.0"),
    (dict(q_start=True), TypeError, "q_start: expected an int >= 0 or None, got bool True"),
    (dict(k_start=np.bool_(False)), TypeError, "k_start: expected an int >= 0, got bool"),
    (dict(k_start=None), TypeError, "k_start: expected an int >= 0, got NoneType None"),
    (dict(k_start="64"), TypeError, "k_start: expected an int >= 0, got str '64'"),
])
def test_bad_offsets_are_refused(kw, error, message):
    q, k, v = make_qkv(1, 8, 8, 1, 1, 8)
    with pytest.raises(error, match=message):
        R.attention(q, k, v, **kw)
    with pytest.raises(error, match=message):
        R.block_max_scores(q, k, **kw)
    with pytest.raises(error, match=message):
        R.gate(np.zeros((1, 1, 1, 1)), None, 8, 8, 128, 64, causal=True, **kw)
    with pytest.raises(error, match=message):
        R.diagonal_tiles(8, 8, 128, 64, **kw)


def test_alignment_follows_the_tile_sizes():
    q, k, v = make_qkv(1, 8, 8, 1, 1, 8)
    R.attention(q, k, v, block_m=16, block_n=8, q_start=np.int64(48), k_start=np.int32(24))
    with pytest.raises(ValueError, match="q_start: expected a multiple of block_m = 16 .*got 8"):
        R.attention(q, k, v, block_m=16, block_n=8, q_start=8)
    with pytest.raises(ValueError, match="k_start: expected a multiple of block_n = 8 .*got 4"):
        R.block_max_scores(q, k, block_m=16, block_n=8, k_start=4)


def test_offsets_are_checked_before_the_memory_guard(monkeypatch):
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", "1")
    q, k, v = make_qkv(1, 8, 8, 1, 1, 8)
    with pytest.raises(ValueError, match="q_start"):
        R.attention(q, k, v, q_start=1)
    with pytest.raises(ValueError, match="k_start"):
        R.block_max_scores(q, k, k_start=1)


# ---------------------------------------------------------------------------------------------
# merge_partials
# ---------------------------------------------------------------------------------------------


def test_merge_matches_the_logsumexp_formula():
    rng = np.random.default_rng(0)
    outs = [rng.standard_normal((2, 5, 3, 4)) for _ in range(3)]
    lses = [rng.standard_normal((2, 3, 5)) * 30 for _ in range(3)]
    out, lse = R.merge_partials(outs, lses)
    want_lse = np.logaddexp(np.logaddexp(lses[0], lses[1]), lses[2])
    assert_close(lse, want_lse, 1e-14, 1e-14, "lse")
    want = sum(np.exp(l - want_lse).transpose(0, 2, 1)[..., None] * o for o, l in zip(outs, lses))
    assert_close(out, want, 1e-14, 1e-14, "out")
    big, big_lse = R.merge_partials([outs[0], outs[1]], [np.full((2, 3, 5), 1e4), np.full((2, 3, 5), 1e4)])
    assert_close(big_lse, np.full((2, 3, 5), 1e4 + math.log(2)), 1e-15, 0, "no overflow at large lse")
    # exp(lse_c - lse) inherits the rounding of lse, about 2e-12 absolute at 1e4
    assert_close(big, (outs[0] + outs[1]) / 2, 1e-11, 1e-11, "equal weights")


def test_merge_of_one_part_is_that_part():
    rng = np.random.default_rng(1)
    o, l = rng.standard_normal((1, 4, 2, 3)).astype(np.float32), rng.standard_normal((1, 2, 4))
    l[0, 1, 2] = -np.inf
    o[0, 2, 1] = 0
    out, lse = R.merge_partials([o], (l,))
    assert out.dtype == lse.dtype == np.float64
    assert np.array_equal(out, o.astype(np.float64)) and np.array_equal(lse, l)


def test_merge_empty_and_poisoned_rows():
    outs = [np.ones((1, 4, 1, 2)), np.full((1, 4, 1, 2), 2.0)]
    l0 = np.array([[[-np.inf, 0.0, -np.inf, np.nan]]])
    l1 = np.array([[[-np.inf, -np.inf, np.inf, 0.0]]])
    outs[1][0, 0, 0, 1] = np.nan  # a non-finite v reaching an empty row
    out, lse = R.merge_partials(outs, [l0, l1])
    assert lse[0, 0, 0] == -np.inf and out[0, 0, 0, 0] == 0 and np.isnan(out[0, 0, 0, 1]), "empty row"
    assert lse[0, 0, 1] == 0.0 and out[0, 1, 0].tolist() == [1.0, 1.0], "a -inf part weighs 0"
    assert np.isnan(lse[0, 0, 2]) and np.isnan(out[0, 2]).all(), "+inf lse"
    assert np.isnan(lse[0, 0, 3]) and np.isnan(out[0, 3]).all(), "NaN lse"


def test_merge_takes_the_varlen_layout():
    rng = np.random.default_rng(2)
    out, lse = R.merge_partials([rng.standard_normal((7, 2, 4))] * 2, [np.zeros((2, 7))] * 2)
    assert out.shape == (7, 2, 4) and np.allclose(lse, math.log(2))


@pytest.mark.parametrize("outs,lses,error,message", [
    ([], [], ValueError, "outs: expected at least one partial result, got 0"),
    (np.zeros((1, 1, 2, 1, 1)), [np.zeros((1, 1, 2))], TypeError,
     "outs: expected a list or tuple of numpy arrays, got ndarray"),
    ([np.zeros((1, 2, 1, 1))], np.zeros((1, 1, 1, 2)), TypeError, "lses: expected a list or tuple"),
    ([np.zeros((1, 2, 1, 1))] * 2, [np.zeros((1, 1, 2))], ValueError, "lses: expected 2 arrays .*got 1"),
    ([np.zeros((1, 2, 1, 1)), [0.0]], [np.zeros((1, 1, 2))] * 2, TypeError,
     r"outs\[1\]: expected a numpy.ndarray, got list"),
    ([np.zeros((1, 2, 1, 1), np.int64)], [np.zeros((1, 1, 2))], TypeError, r"outs\[0\]: expected dtype in"),
    ([np.zeros((2, 1))], [np.zeros((1, 2))], ValueError, r"outs\[0\]: expected shape \(..., N, H, D\)"),
    ([np.zeros((1, 2, 1, 1)), np.zeros((1, 3, 1, 1))], [np.zeros((1, 1, 2))] * 2, ValueError,
     r"outs\[1\]: expected shape \(1, 2, 1, 1\) \(that of outs\[0\]\), got \(1, 3, 1, 1\)"),
    ([np.zeros((1, 2, 3, 1))], [np.zeros((1, 2, 3))], ValueError,
     r"lses\[0\]: expected shape \(1, 3, 2\) \(..., H, N\) from outs \(1, 2, 3, 1\), got \(1, 2, 3\)"),
])
def test_merge_refuses_bad_parts(outs, lses, error, message):
    with pytest.raises(error, match=message):
        R.merge_partials(outs, lses)
