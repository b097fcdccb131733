"""The warp-specialised Hopper kernel's split entry (bsfa_fwd_split of bsfa_fwd_sm90ws.cu: key blocks of
each 128-row query tile split over the persistent grid, fp32 partials merged by bsfa_combine) against the
reference, its independence of the split count, and the routing of ``auto`` chunks to it.

Forced num_splits in {1, 2, 3, 64} (64: more splits than 128-key blocks, so empty splits too), Nq from
33 (the shortest chunk ``auto`` sends here) to 577, odd Nk, GQA groups 1 / 4, thresholds that skip.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bsfa_reference as ref
from tests.gpu.conftest import _is_hopper
from tests.support.gpu import (
    EPS,
    assert_nonfinite_like_reference,
    cp,
    planted_nonfinite,
    poison_outputs,
    random_inputs,
    requires_gpu,
    run_case,
    without_head_pairs,
)
from tests.support.split_checks import (
    assert_split_count_independent,
    check_split_example,
    split_count_results,
    split_fields,
    split_problem,
)

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]

BM, BN = ref.BLOCK_M, ref.BLOCK_N
SPLITS = [1, 2, 3, 64]
NQS = [33, 64, 100, 128, 129, 300, 577]


@st.composite
def ws_split_problems(draw):
    G = draw(st.sampled_from([1, 4]))
    Hkv = draw(st.integers(1, 2))
    Nq = draw(st.sampled_from(NQS))
    Nk = draw(st.sampled_from([1, 63, 577, 1000, 2100]))
    return dict(Hkv=Hkv, Hq=Hkv * G, Nq=Nq, Nk=Nk, **split_fields(draw, SPLITS))


@given(ws_split_problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # examples: profile
def test_ws_split_matches_reference(monkeypatch, p):
    check_split_example(monkeypatch, p, "sm90ws")


@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("Nq", NQS)
def test_ws_split_query_lengths(monkeypatch, Nq, num_splits):
    """One ragged 128-row tile (33, 64, 100), one whole (128), several with a ragged last one (129, 300, 577)."""
    p = split_problem(Nq, 1000, 4, D=64 if Nq % 2 else 128, causal=Nq != 128, Hkv=2, seed=Nq * 7 + num_splits)
    run_case(p, monkeypatch, "sm90ws", num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_ws_split_keys_on_both_sides_of_the_diagonal(monkeypatch, causal, num_splits):
    """Queries in the middle of the keys (q_start 640 of 2000 keys): gated, diagonal and, causal, masked
    blocks in one split's range, and non-causal keys past the diagonal."""
    p = split_problem(200, 2000, 4, causal=causal, q_start=640, seed=3 + num_splits)
    run_case(p, monkeypatch, "sm90ws", num_splits=num_splits)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk,G", [(100, 4097, 4), (300, 1000, 1), (129, 2100, 8)])
def test_ws_results_do_not_depend_on_the_split_count(monkeypatch, causal, Nq, Nk, G):
    """keep exactly equal; lse and out equal up to fp32 rounding of the merge (out: one rounding of the
    input dtype on top); one split is bitwise the unsplit kernel (the merge of one part is exact)."""
    calls = {f"num_splits={s}": dict(backend="sm90ws", num_splits=s) for s in (1, 2, 3, 7, 64)}
    calls.update(auto=dict(backend="auto"), unsplit=dict(backend="sm90ws"))
    without_head_pairs(monkeypatch)  # the unsplit call on the split entry's arithmetic (128-key blocks)
    results = split_count_results(monkeypatch, Nq, Nk, G, causal, calls)
    for x, y, name in zip(results["num_splits=1"], results["unsplit"], ("out", "lse", "keep")):
        assert np.array_equal(x, y, equal_nan=True), f"num_splits=1: {name} differs from the unsplit kernel"
    assert_split_count_independent(results, "num_splits=1")


def test_auto_routes_chunks_to_the_ws_split_bitwise():
    """backend="auto" on a chunk too small to fill the GPU (Nq >= 33, or >= 17 in even groups) is the
    sm90ws split entry with the heuristic split count (two heads a tile up to 64 rows), or its unsplit
    kernel where that count is 1; decode shapes stay on the mma.sync split family."""
    import bsfa_cupy
    from bsfa_cupy import _splitkv
    from bsfa_cupy._kernels import sm_count

    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, 1, 128, 8192, 8, 2, 128, "float16")
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    # 128 rows of an even group: the head-pair split entry
    splits = _splitkv.plan(1, 128, 8192, 8, 2, sm_count(cp.cuda.Device().id), gated=True, ws=True,
                           head_pairs=True).splits
    assert splits > 1
    a = bsfa_cupy.attention(qd, kd, vd, 0.0, return_lse=True)
    b = bsfa_cupy.attention(qd, kd, vd, 0.0, return_lse=True, backend="sm90ws", num_splits=splits)
    for x, y in zip(a, b):
        assert cp.array_equal(x, y)
    plan = bsfa_cupy.AttentionPlan(qd, kd, vd, 0.0, return_lse=True)
    assert plan.split is not None and plan.split.ws and plan.split.headpair and plan.split.splits == splits
    for x, y in zip(plan.run(qd, kd, vd), a):
        assert cp.array_equal(x, y)
    assert not bsfa_cupy.AttentionPlan(qd[:, :16], kd, vd).split.ws
    assert bsfa_cupy.AttentionPlan(qd[:, :32], kd, vd).split.pack == 2
    sms = sm_count(cp.cuda.Device().id)
    Nq = 128 * max(1, sms // 8 - 1)  # 8 heads: B * Hq * nQ < SMs, one split already fills the GPU
    assert _splitkv.wanted("auto", None, 1, Nq, 8192, 8, 128, sms)
    assert _splitkv.plan(1, Nq, 8192, 8, 2, sms, ws=True).splits == 1
    q, k, v = random_inputs(rng, 1, Nq, 8192, 8, 2, 128, "float16")
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    plan = bsfa_cupy.AttentionPlan(qd, kd, vd)
    assert plan.split is None, "one split: the unsplit kernel, no merge"
    assert cp.array_equal(plan.run(qd, kd, vd), bsfa_cupy.attention(qd, kd, vd, backend="sm90ws"))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,G", [(1, 2), (17, 4), (33, 8), (64, 2), (64, 6)])
def test_ws_pack_two_heads_a_tile(monkeypatch, Nq, G, causal):
    """Nq <= 64, even groups: two query heads in one 128-row tile (bsfa_fwd_split_pack), each consumer
    warpgroup deciding its head's gates alone; G = 6 has three pairs a group."""
    p = split_problem(Nq, 3000, G, causal=causal, Hkv=2, seed=Nq + G, q_start=None if causal else 1024)
    run_case(p, monkeypatch, "sm90ws", num_splits=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_ws_pack_heads_decide_alone(monkeypatch, bad):
    """The two heads of a packed tile disagree on a tile whose V holds a NaN / inf: the head that keeps it
    gets a non-finite column (the reference's P @ V), the head that skips it must not, although both
    multiply from the same V buffer."""
    import bsfa_cupy

    rng = np.random.default_rng(3)
    Nq, Nk, G, D = 40, 1000, 2, 64
    q, k, v = random_inputs(rng, 1, Nq, Nk, G, 1, D, "float16")
    v[0, 300, 0, 5] = bad  # key tile 4, gated (the diagonal tiles are the last)
    thr = np.full((G, (Nk - Nq) // BM + 1), np.inf, np.float32)
    thr[0] = -np.inf  # head 0 keeps every tile, head 1 only the diagonal ones
    poison_outputs(monkeypatch)
    out, lse, keep = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), thr, return_lse=True, return_keep=True,
                                         backend="sm90ws", num_splits=2)
    r_out, r_lse, r_keep = ref.attention(q, k, v, thr, return_lse=True, return_keep=True)
    assert np.array_equal(cp.asnumpy(keep), r_keep)
    assert r_keep[0, 0, 0, 4] and not r_keep[0, 1, 0, 4]
    out = cp.asnumpy(out).astype(np.float64)
    got_bad, want_bad = ~np.isfinite(out), ~np.isfinite(r_out)
    assert want_bad[0, :, 0, 5].all() and want_bad.sum() == Nq
    assert np.array_equal(got_bad, want_bad), (np.argwhere(got_bad != want_bad)[:5].tolist())
    fin = ~want_bad
    err = np.abs(out[fin] - r_out[fin]).max()
    assert err <= 4 * EPS["float16"] * max(1.0, np.abs(r_out[fin]).max()), f"out differs by {err:.3e}"
    assert np.abs(cp.asnumpy(lse) - r_lse).max() <= 1e-4


def test_ws_split_rows_without_keys(monkeypatch):
    """Nq > Nk bottom-right: rows before the first key have no valid key in any split (lse -inf, out 0),
    and with 64 splits most splits of a 64-key call are empty."""
    import bsfa_cupy

    poison_outputs(monkeypatch)
    for Nq, Nk in ((300, 64), (129, 1), (577, 200)):
        rng = np.random.default_rng(Nq)
        q, k, v = random_inputs(rng, 1, Nq, Nk, 4, 1, 64, "float16")
        out, lse, keep = bsfa_cupy.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), 0.0, return_lse=True,
                                             return_keep=True, backend="sm90ws", num_splits=64)
        r_out, r_lse, r_keep = ref.attention(q, k, v, 0.0, return_lse=True, return_keep=True)
        assert np.array_equal(cp.asnumpy(keep), r_keep)
        dead = ~np.isfinite(r_lse)
        assert dead.any(), "the case should have rows without a key"
        assert np.array_equal(cp.asnumpy(lse)[dead], r_lse[dead])
        assert not cp.asnumpy(out)[dead.transpose(0, 2, 1)].any()
        err = np.abs(cp.asnumpy(lse)[~dead] - r_lse[~dead]).max()
        assert err <= 1e-4, f"lse differs by {err:.3e}"


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_ws_split_nonfinite_inputs_reach_exactly_the_reference_rows(monkeypatch, gated, causal):
    """NaN / inf in q, k and v reach the reference's outputs (non-finite) and lse (NaN) exactly over three
    splits; the merge poisons a row with a NaN part."""
    import bsfa_cupy

    q, k, v, thr = planted_nonfinite(2 * gated + causal, (1, 200, 1100, 8, 2, 64), causal, gated,
                                     q_at=[(0, 150, 1, 5), (0, 17, 3, 0)], k_at=[(0, 150, 0, 3), (0, 1090, 1, 7)],
                                     v_at=[(0, 70, 1, 2), (0, 600, 0, 0)])
    poison_outputs(monkeypatch)
    res = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), thr, causal=causal, return_lse=True, return_keep=True,
                              backend="sm90ws", num_splits=3)
    assert_nonfinite_like_reference(q, k, v, causal, *(cp.asnumpy(x) for x in res))


def test_ws_split_errors():
    """sm90ws takes num_splits (its split entry); the other explicit kernels do not."""
    import bsfa_cupy

    q = cp.zeros((1, 128, 4, 64), cp.float16)
    k = cp.zeros((1, 640, 1, 64), cp.float16)
    for backend in ("sm80", "sm90"):
        with pytest.raises(ValueError, match=rf"num_splits: applies to the split-KV kernels .* got backend '{backend}'"):
            bsfa_cupy.attention(q, k, k, num_splits=2, backend=backend)
    with pytest.raises(ValueError, match=r"backend 'sm90ws': expected head_dim in \(64, 128\), got 32"):
        q32 = cp.zeros((1, 128, 4, 32), cp.float16)
        k32 = cp.zeros((1, 64, 1, 32), cp.float16)
        bsfa_cupy.attention(q32, k32, k32, num_splits=2, backend="sm90ws")
