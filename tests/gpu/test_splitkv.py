"""The split-KV kernel (bsfa_fwd_splitkv.cu: packed GQA rows, key tiles split over CTAs, fp32 merge)
against the reference, and its independence of the split count.

Forced num_splits in {1, 2, 3, 64} (64: more splits than key tiles, so empty splits too), Nq from 1
(decode) to 300 (several reference query tiles), odd Nk, GQA groups 1 / 4 / 8, thresholds that skip.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bsfa_reference as ref
from tests.support.gpu import (
    EPS,
    assert_nonfinite_like_reference,
    cp,
    planted_nonfinite,
    poison_outputs,
    random_inputs,
    requires_gpu,
    run_case,
)
from tests.support.split_checks import (
    assert_split_count_independent,
    check_split_example,
    split_count_results,
    split_fields,
    split_problem,
)

pytestmark = [pytest.mark.gpu, requires_gpu]

BM, BN = ref.BLOCK_M, ref.BLOCK_N
SPLITS = [1, 2, 3, 64]
NQS = [1, 3, 16, 100, 128, 129, 300]


@st.composite
def split_problems(draw):
    G = draw(st.sampled_from([1, 4, 8]))
    Hkv = draw(st.integers(1, 2)) if G < 8 else 1
    Nq = draw(st.sampled_from(NQS))
    # the NumPy reference is the slow part: long keys only for short queries
    Nk = draw(st.sampled_from([1, 63, 577, 1000]) if Nq > 16 else st.sampled_from([1, 64, 577, 4097]))
    return dict(Hkv=Hkv, Hq=Hkv * G, Nq=Nq, Nk=Nk, **split_fields(draw, [None, *SPLITS]))


@given(split_problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # examples: profile
def test_splitkv_matches_reference(monkeypatch, p):
    check_split_example(monkeypatch, p, "splitkv")


@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("Nq", NQS)
def test_splitkv_query_lengths(monkeypatch, Nq, num_splits):
    """Every packing shape: Nq = 1 / 3 pack the group into one 16-row key-split CTA, 16 into 64 rows,
    100 / 128 take 128-row CTAs one head each, 129 / 300 several reference query tiles (a ragged
    last one)."""
    G = 4 if Nq <= 16 else 1
    p = split_problem(Nq, 577, G, D=64 if Nq % 2 else 128, causal=Nq != 128, seed=Nq * 7 + num_splits)
    run_case(p, monkeypatch, "splitkv", num_splits=num_splits)


@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["none", "maxima"])
def test_splitkv_gqa_groups(monkeypatch, G, dtype, mode):
    """Packed heads with their own gate decisions (maxima: per-head thresholds that skip about half
    of the gated tiles, so heads of one CTA disagree)."""
    p = split_problem(3, 4097, G, dtype=dtype, mode=mode, Hkv=2, seed=G)
    run_case(p, monkeypatch, "splitkv", num_splits=3)


@pytest.mark.parametrize("Nq,G,D,causal", [(1, 16, 128, True), (2, 8, 64, False), (16, 1, 128, True), (5, 2, 64, True)])
def test_splitkv_key_split_rows(monkeypatch, Nq, G, D, causal):
    """The 16-row key-split kernel (4 warps on 16-key slices of each tile, merged at the end) at its
    edges: a full 16-head pack, a ragged key tail, per-head gates that disagree."""
    from bsfa_cupy._splitkv import pack_shape

    assert pack_shape(Nq, G) == (16, G)
    p = split_problem(Nq, 1000 + Nq, G, D=D, causal=causal, Hkv=2, seed=31 * G + Nq)
    run_case(p, monkeypatch, "splitkv", num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("Nq,G", [(1, 4), (16, 4), (128, 1)])
def test_splitkv_keys_on_both_sides_of_the_diagonal(monkeypatch, Nq, G, num_splits):
    """Non-causal with the queries amid the keys: walking its key tiles from the last one down, a CTA
    meets gated tiles, the diagonal (forced) ones, then gated ones again, so the P V that runs a tile
    late takes a voted V into a forced tile's step and a forced V into a voted one's, in each split
    kernel (16, 64 and 128 packed rows), with per-head thresholds that skip about half the tiles."""
    Nk, q_start = 2000, 5 * BM
    diag = ref.diagonal_tiles(Nq, Nk, BM, BN, q_start=q_start)
    cols = np.flatnonzero(diag.any(axis=0))
    assert 0 < cols.min() and cols.max() < diag.shape[1] - 1, "the diagonal must sit strictly inside the keys"
    p = split_problem(Nq, Nk, G, causal=False, Hkv=2, seed=11 * Nq + num_splits, q_start=q_start)
    run_case(p, monkeypatch, "splitkv", num_splits=num_splits)


@pytest.mark.parametrize("Nq,Nk,G,num_splits", [(1, 32768 + 37, 4, None), (16, 20000, 4, 64)])
def test_splitkv_long_keys(monkeypatch, Nq, Nk, G, num_splits):
    p = split_problem(Nq, Nk, G, seed=Nk)
    run_case(p, monkeypatch, "splitkv", num_splits=num_splits)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk,G", [(1, 4097, 4), (16, 2100, 8), (300, 1000, 1)])
def test_results_do_not_depend_on_the_split_count(monkeypatch, causal, Nq, Nk, G):
    """keep exactly equal; lse and out equal up to fp32 rounding of the merge (out: one rounding of
    the input dtype on top)."""
    calls = {f"num_splits={s}": dict(backend="splitkv", num_splits=s) for s in (1, 2, 3, 7, 64, None)}
    assert_split_count_independent(split_count_results(monkeypatch, Nq, Nk, G, causal, calls), "num_splits=1")


def test_auto_routes_decode_to_splitkv_bitwise():
    """backend="auto" on a decode shape is the split-KV kernel with the heuristic split count."""
    import bsfa_cupy

    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, 1, 1, 4097, 8, 2, 128, "float16")
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    a = bsfa_cupy.attention(qd, kd, vd, 0.0, return_lse=True)
    b = bsfa_cupy.attention(qd, kd, vd, 0.0, return_lse=True, backend="splitkv")
    for x, y in zip(a, b):
        assert cp.array_equal(x, y)


def test_num_splits_and_backend_errors():
    import bsfa_cupy

    q = cp.zeros((1, 1, 4, 64), cp.float16)
    k = cp.zeros((1, 64, 1, 64), cp.float16)
    with pytest.raises(ValueError, match=r"num_splits: expected an int in \[1, 1024\] or None \(heuristic\), got 0"):
        bsfa_cupy.attention(q, k, k, num_splits=0)
    with pytest.raises(TypeError, match="num_splits: expected an int >= 1 or None"):
        bsfa_cupy.attention(q, k, k, num_splits=2.0)
    with pytest.raises(ValueError, match="backend 'sm80'"):
        bsfa_cupy.attention(q, k, k, num_splits=2, backend="sm80")
    with pytest.raises(ValueError, match="splitkv"):
        bsfa_cupy.block_max_scores(q, k, backend="splitkv")
    with pytest.raises(ValueError, match=r"backend 'splitkv': expected head_dim in \(64, 128\), got 32"):
        q32 = cp.zeros((1, 1, 4, 32), cp.float16)
        k32 = cp.zeros((1, 64, 1, 32), cp.float16)
        bsfa_cupy.attention(q32, k32, k32, num_splits=2)


def test_empty_and_degenerate_shapes(monkeypatch):
    """Fewer keys than one tile, queries mostly before the keys (bottom-right, Nq > Nk: rows without a
    key), one key."""
    import bsfa_cupy

    poison_outputs(monkeypatch)
    for Nq, Nk in ((5, 63), (300, 64), (1, 1)):
        rng = np.random.default_rng(Nq)
        q, k, v = random_inputs(rng, 1, Nq, Nk, 4, 1, 64, "float16")
        out, lse, keep = bsfa_cupy.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), 0.0, return_lse=True,
                                             return_keep=True, backend="splitkv", num_splits=3)
        r_out, r_lse, r_keep = ref.attention(q, k, v, 0.0, return_lse=True, return_keep=True)
        assert np.array_equal(cp.asnumpy(keep), r_keep)
        dead = ~np.isfinite(r_lse)
        assert np.array_equal(cp.asnumpy(lse)[dead], r_lse[dead])
        assert not cp.asnumpy(out)[dead.transpose(0, 2, 1)].any()
        assert np.allclose(cp.asnumpy(lse)[~dead], r_lse[~dead], atol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_v_reaches_only_the_heads_keeping_its_tile(monkeypatch, num_splits, bad):
    """Packed heads disagree on a tile whose V holds a NaN / inf: the heads that keep it get NaN in that
    column (as the reference's P @ V), the heads that skip it must not (the tile does not exist for
    them), although they share the CTA and its P V product."""
    import bsfa_cupy

    rng = np.random.default_rng(7)
    Nq, Nk, G, D = 1, 577, 4, 64
    q, k, v = random_inputs(rng, 1, Nq, Nk, G, 1, D, "float16")
    v[0, 100, 0, 5] = bad  # key tile 1, a gated tile (the diagonal one is the last)
    thr = np.full((G, Nk // BM + 1), np.inf, np.float32)
    thr[0] = -np.inf  # head 0 keeps every tile, heads 1..3 only the diagonal one
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    poison_outputs(monkeypatch)
    out, lse, keep = bsfa_cupy.attention(qd, kd, vd, thr, return_lse=True, return_keep=True, backend="splitkv",
                                         num_splits=num_splits)
    r_out, r_lse, r_keep = ref.attention(q, k, v, thr, return_lse=True, return_keep=True)
    out = cp.asnumpy(out).astype(np.float64)
    assert np.array_equal(cp.asnumpy(keep), r_keep)
    assert r_keep[0, 0, 0, 1] and not r_keep[0, 1:, 0, 1].any()
    got_bad, want_bad = ~np.isfinite(out), ~np.isfinite(r_out)
    assert want_bad[0, 0, 0, 5] and want_bad.sum() == 1
    assert np.array_equal(got_bad, want_bad), (np.argwhere(got_bad), np.argwhere(want_bad))
    fin = ~want_bad
    assert np.abs(out[fin] - r_out[fin]).max() <= 4 * EPS["float16"] * max(1.0, np.abs(r_out[fin]).max())
    assert np.allclose(cp.asnumpy(lse), r_lse, atol=1e-4)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_nonfinite_inputs_reach_exactly_the_reference_rows(monkeypatch, gated, causal):
    """As tests/gpu/test_attention.py's test of the same name, on packed heads and three splits: NaN / inf
    in q, k and v reach the reference's outputs (non-finite) and lse (NaN) exactly; the merge poisons a
    row with a NaN part."""
    import bsfa_cupy

    q, k, v, thr = planted_nonfinite(2 * gated + causal, (1, 40, 700, 8, 2, 64), causal, gated,
                                     q_at=[(0, 20, 1, 5), (0, 17, 3, 0)], k_at=[(0, 150, 0, 3), (0, 690, 1, 7)],
                                     v_at=[(0, 70, 1, 2), (0, 300, 0, 0)])
    poison_outputs(monkeypatch)
    res = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), thr, causal=causal, return_lse=True, return_keep=True,
                              backend="splitkv", num_splits=3)
    assert_nonfinite_like_reference(q, k, v, causal, *(cp.asnumpy(x) for x in res))
