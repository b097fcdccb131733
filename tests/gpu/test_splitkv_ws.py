"""The warp-specialised Hopper kernel's split entry (bsfa_fwd_split of bsfa_fwd_sm90ws.cu: key blocks of
each 128-row query tile split over the persistent grid, fp32 partials merged by bsfa_combine) against the
reference, its independence of the split count, and the routing of ``auto`` chunks to it.

Forced num_splits in {1, 2, 3, 64} (64: more splits than 128-key blocks, so empty splits too), Nq from
33 (the shortest chunk ``auto`` sends here) to 577, odd Nk, GQA groups 1 / 4, thresholds that skip.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import bsfa_reference as ref
from tests.gpu.conftest import _is_hopper
from tests.support.gpu import (
    EPS,
    cp,
    poison_outputs,
    random_inputs,
    requires_gpu,
    rounding_margin,
    run_case,
    thresholds_from_maxima,
)

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]

BM, BN = ref.BLOCK_M, ref.BLOCK_N
SPLITS = [1, 2, 3, 64]
NQS = [33, 64, 100, 128, 129, 300, 577]


def _problem(Nq, Nk, G, D=128, dtype="float16", causal=True, mode="maxima", Hkv=1, B=1, seed=0, **extra):
    return dict(dtype=dtype, D=D, causal=causal, B=B, Hkv=Hkv, Hq=Hkv * G, Nq=Nq, Nk=Nk, mode=mode,
                layouts=("contiguous",) * 3, spread=1.0, seed=seed, **extra)


@st.composite
def ws_split_problems(draw):
    G = draw(st.sampled_from([1, 4]))
    Hkv = draw(st.integers(1, 2))
    Nq = draw(st.sampled_from(NQS))
    return dict(
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        D=draw(st.sampled_from([64, 128])),
        causal=draw(st.booleans()),
        B=draw(st.integers(1, 2)),
        Hkv=Hkv,
        Hq=Hkv * G,
        Nq=Nq,
        Nk=draw(st.sampled_from([1, 63, 577, 1000, 2100])),
        q_start=draw(st.one_of(st.none(), st.none(), st.integers(0, 8).map(lambda t: t * BM))),
        k_start=draw(st.one_of(st.just(0), st.integers(0, 16).map(lambda t: t * BN))),
        mode=draw(st.sampled_from(["none", "scalar", "maxima", "maxima", "short"])),
        layouts=draw(st.tuples(*[st.sampled_from(["contiguous", "bhnd", "padded"])] * 3)),
        spread=draw(st.sampled_from([0.5, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        num_splits=draw(st.sampled_from(SPLITS)),
    )


@given(ws_split_problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # examples: profile
def test_ws_split_matches_reference(monkeypatch, p):
    with monkeypatch.context() as m:
        info, (err, base_err) = run_case(p, m, "sm90ws", num_splits=p["num_splits"])
    note(f"{info}; out error {err:.2e} vs low-precision baseline {base_err:.2e}")


@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("Nq", NQS)
def test_ws_split_query_lengths(monkeypatch, Nq, num_splits):
    """One ragged 128-row tile (33, 64, 100), one whole (128), several with a ragged last one (129, 300, 577)."""
    p = _problem(Nq, 1000, 4, D=64 if Nq % 2 else 128, causal=Nq != 128, Hkv=2, seed=Nq * 7 + num_splits)
    run_case(p, monkeypatch, "sm90ws", num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_ws_split_keys_on_both_sides_of_the_diagonal(monkeypatch, causal, num_splits):
    """Queries in the middle of the keys (q_start 640 of 2000 keys): gated, diagonal and, causal, masked
    blocks in one split's range, and non-causal keys past the diagonal."""
    p = _problem(200, 2000, 4, causal=causal, q_start=640, seed=3 + num_splits)
    run_case(p, monkeypatch, "sm90ws", num_splits=num_splits)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk,G", [(100, 4097, 4), (300, 1000, 1), (129, 2100, 8)])
def test_ws_results_do_not_depend_on_the_split_count(monkeypatch, causal, Nq, Nk, G):
    """keep exactly equal; lse and out equal up to fp32 rounding of the merge (out: one rounding of the
    input dtype on top); one split is bitwise the unsplit kernel (the merge of one part is exact)."""
    import bsfa_cupy

    rng = np.random.default_rng(Nq + Nk)
    q, k, v = random_inputs(rng, 1, Nq, Nk, 2 * G, 2, 128, "bfloat16")
    tile_max = ref.block_max_scores(q, k, causal=causal)
    thr = thresholds_from_maxima(tile_max, Nq, Nk, margin=rounding_margin(q, k, causal, 128))
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    poison_outputs(monkeypatch)
    whole = bsfa_cupy.attention(qd, kd, vd, thr, causal=causal, return_lse=True, return_keep=True,
                                backend="sm90ws")
    results = {}
    for s in (1, 2, 3, 7, 64, None):
        res = bsfa_cupy.attention(qd, kd, vd, thr, causal=causal, return_lse=True, return_keep=True,
                                  backend="sm90ws" if s else "auto", num_splits=s)
        results[s] = [cp.asnumpy(x) for x in res]
    for x, y, name in zip(results[1], whole, ("out", "lse", "keep")):
        assert np.array_equal(x, cp.asnumpy(y), equal_nan=True), f"num_splits=1: {name} differs from the unsplit kernel"
    out1, lse1, keep1 = (x.astype(np.float64) if x.dtype != bool else x for x in results[1])
    assert keep1.any() and not keep1.all(), "thresholds should keep some tiles and skip others"
    for s, (out, lse, keep) in results.items():
        assert np.array_equal(keep, keep1), f"num_splits={s}: keep differs from num_splits=1"
        live = np.isfinite(lse1)
        assert np.array_equal(np.isfinite(lse), live), f"num_splits={s}: other empty rows"
        lerr = np.abs(lse[live] - lse1[live]).max(initial=0)
        assert lerr <= 1e-5 * max(1.0, np.abs(lse1[live]).max(initial=1)), f"num_splits={s}: lse differs by {lerr:.3e}"
        err = np.abs(out.astype(np.float64) - out1)
        tol = 2 * EPS["bfloat16"] * max(1.0, float(np.abs(out1).max()))
        assert err.max() <= tol, f"num_splits={s}: out differs by {err.max():.3e} at {int((err > tol).sum())} entries"


def test_auto_routes_chunks_to_the_ws_split_bitwise():
    """backend="auto" on a chunk too small to fill the GPU (Nq >= 33) is the sm90ws split entry with the
    heuristic split count, or its unsplit kernel where that count is 1; decode shapes and packed GQA
    rows stay on the mma.sync split family."""
    import bsfa_cupy
    from bsfa_cupy import _splitkv
    from bsfa_cupy._kernels import sm_count

    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, 1, 128, 8192, 8, 2, 128, "float16")
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    splits = _splitkv.plan(1, 128, 8192, 8, 2, sm_count(cp.cuda.Device().id), gated=True, ws=True).splits
    assert splits > 1
    a = bsfa_cupy.attention(qd, kd, vd, 0.0, return_lse=True)
    b = bsfa_cupy.attention(qd, kd, vd, 0.0, return_lse=True, backend="sm90ws", num_splits=splits)
    for x, y in zip(a, b):
        assert cp.array_equal(x, y)
    plan = bsfa_cupy.AttentionPlan(qd, kd, vd, 0.0, return_lse=True)
    assert plan.split is not None and plan.split.ws and plan.split.splits == splits
    for x, y in zip(plan.run(qd, kd, vd), a):
        assert cp.array_equal(x, y)
    assert not bsfa_cupy.AttentionPlan(qd[:, :32], kd, vd).split.ws
    sms = sm_count(cp.cuda.Device().id)
    Nq = 128 * max(1, sms // 8 - 1)  # 8 heads: B * Hq * nQ < SMs, one split already fills the GPU
    assert _splitkv.wanted("auto", None, 1, Nq, 8192, 8, 128, sms)
    assert _splitkv.plan(1, Nq, 8192, 8, 2, sms, ws=True).splits == 1
    q, k, v = random_inputs(rng, 1, Nq, 8192, 8, 2, 128, "float16")
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    plan = bsfa_cupy.AttentionPlan(qd, kd, vd)
    assert plan.split is None, "one split: the unsplit kernel, no merge"
    assert cp.array_equal(plan.run(qd, kd, vd), bsfa_cupy.attention(qd, kd, vd, backend="sm90ws"))


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

    rng = np.random.default_rng(2 * gated + causal)
    B, Nq, Nk, Hq, Hkv, D = 1, 200, 1100, 8, 2, 64
    q, k, v = random_inputs(rng, B, Nq, Nk, Hq, Hkv, D, "float16")
    thr = thresholds_from_maxima(ref.block_max_scores(q, k, causal=causal), Nq, Nk) if gated else None
    q[0, 150, 1, 5] = np.nan
    q[0, 17, 3, 0] = np.inf
    k[0, 150, 0, 3] = np.nan
    k[0, 1090, 1, 7] = -np.inf
    v[0, 70, 1, 2] = np.nan
    v[0, 600, 0, 0] = np.inf
    poison_outputs(monkeypatch)
    out, lse, keep = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), thr, causal=causal, return_lse=True,
                                         return_keep=True, backend="sm90ws", num_splits=3)
    out, lse, keep = cp.asnumpy(out), cp.asnumpy(lse), cp.asnumpy(keep)
    want_out, want_lse = ref.attention(q, k, v, causal=causal, keep=keep, return_lse=True)
    got_bad, want_bad = ~np.isfinite(out), ~np.isfinite(want_out)
    assert want_bad.any(), "the planted values reached no output: the test checks nothing"
    assert np.array_equal(got_bad, want_bad), (
        f"non-finite outputs differ at {int((got_bad != want_bad).sum())} entries "
        f"(first {np.argwhere(got_bad != want_bad)[:5].tolist()})"
    )
    assert np.array_equal(np.isnan(lse), np.isnan(want_lse))
    assert np.array_equal(lse == -np.inf, want_lse == -np.inf)
    ok = ~want_bad
    err = np.abs(out[ok].astype(np.float64) - want_out[ok])
    tol = 16 * EPS["float16"] * np.abs(v[np.isfinite(v)]).max()
    assert err.max() <= tol, f"out differs by {err.max():.3e} at {int((err > tol).sum())} entries"
    fin = np.isfinite(want_lse)
    assert np.abs(lse[fin] - want_lse[fin]).max() <= 1e-2


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
