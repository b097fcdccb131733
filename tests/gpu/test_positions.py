"""Explicit positions (q_start / k_start) on both kernels against the reference: single calls, tile maxima,
and split calls merged with bsfa_reference.merge_partials against one full call."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import bsfa_reference as ref
from tests.support.gpu import (
    EPS,
    ERR_FACTOR,
    cp,
    device_array,
    lowp_attention,
    poison_outputs,
    random_inputs,
    requires_gpu,
    rounding_margin,
    run_case,
    thresholds_from_maxima,
)

pytestmark = [pytest.mark.gpu, requires_gpu]

BM, BN = ref.BLOCK_M, ref.BLOCK_N


@st.composite
def offset_problems(draw):
    Hkv = draw(st.integers(1, 2))
    Nq = draw(st.integers(1, 600))
    return dict(
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        D=draw(st.sampled_from([64, 128, 64, 128, 32, 96])),
        causal=draw(st.booleans()),
        B=draw(st.integers(1, 2)),
        Hkv=Hkv,
        Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
        Nq=Nq,
        Nk=draw(st.one_of(st.integers(1, 600), st.just(Nq))),
        # aligned offsets, including query parts entirely before or after the keys
        q_start=draw(st.one_of(st.none(), st.integers(0, 8).map(lambda t: t * BM))),
        k_start=draw(st.integers(0, 16).map(lambda t: t * BN)),
        mode=draw(st.sampled_from(["none", "scalar", "maxima", "maxima", "short"])),
        layouts=draw(st.tuples(*[st.sampled_from(["contiguous", "bhnd", "padded"])] * 3)),
        spread=draw(st.sampled_from([0.5, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(offset_problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # examples: profile
def test_offsets_match_reference(monkeypatch, backend, p):
    with monkeypatch.context() as m:
        info, (err, base_err) = run_case(p, m, backend)
    note(f"{info}; out error {err:.2e} vs low-precision baseline {base_err:.2e}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("q_start,k_start", [(0, 640), (128, 192), (512, 0), (1024, 256), (0, 0)])
def test_offset_corners(monkeypatch, backend, causal, D, q_start, k_start):
    """Keys entirely after the queries (every causal row empty), a key part starting inside a query
    tile, queries far after the keys (no diagonal tile), and the origin."""
    p = dict(dtype="bfloat16", D=D, causal=causal, B=1, Hkv=2, Hq=4, Nq=333, Nk=300, mode="maxima",
             layouts=("contiguous",) * 3, spread=1.0, seed=q_start + k_start + D, q_start=q_start, k_start=k_start)
    run_case(p, monkeypatch, backend)


def test_keys_after_every_query_give_empty_rows(backend):
    """Causal, every key after every query: out 0, lse -inf and no kept tile, exactly as the reference."""
    import bsfa_cupy

    rng = np.random.default_rng(7)
    q, k, v = random_inputs(rng, 1, 200, 150, 4, 2, 128, "float16")
    out, lse, keep = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), 0.0, q_start=0, k_start=256,
                                         return_lse=True, return_keep=True, backend=backend)
    want_out, want_lse, want_keep = ref.attention(q, k, v, 0.0, q_start=0, k_start=256, return_lse=True,
                                                  return_keep=True)
    assert not want_keep.any() and (want_lse == -np.inf).all() and not want_out.any(), "the reference changed"
    np.testing.assert_array_equal(cp.asnumpy(keep), want_keep)
    np.testing.assert_array_equal(cp.asnumpy(lse), want_lse.astype(np.float32))
    assert not cp.asnumpy(out).any(), f"{int((cp.asnumpy(out) != 0).sum())} nonzero outputs of empty rows"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Nq,Nk", [(256, 640), (128, 128), (384, 448), (300, 300)])
def test_explicit_bottom_right_equals_the_default_bitwise(backend, causal, Nq, Nk):
    """q_start = k_start + Nk - Nq spelled out is the default call, bit for bit."""
    import bsfa_cupy

    rng = np.random.default_rng(Nq + Nk)
    q, k, v = random_inputs(rng, 2, Nq, Nk, 4, 1, 64, "float16")
    qd, kd, vd = map(cp.asarray, (q, k, v))
    thr = thresholds_from_maxima(ref.block_max_scores(q, k, causal=causal), Nq, Nk)
    k0 = (Nk - Nq) % BM  # the smallest k_start with an aligned q_start; 0 or 64 here
    q0 = k0 + Nk - Nq
    assert q0 % BM == 0 and k0 % BN == 0
    kw = dict(causal=causal, return_lse=True, return_keep=True, backend=backend)
    default = bsfa_cupy.attention(qd, kd, vd, thr, **kw)
    if k0 == 0:
        explicit = bsfa_cupy.attention(qd, kd, vd, thr, q_start=q0, **kw)
        for name, a, b in zip(("out", "lse", "keep"), default, explicit):
            assert cp.array_equal(a, b), f"{name}: explicit bottom-right offsets differ from the default"
    # shifting both offsets by the same aligned amount moves only the threshold positions
    shifted = bsfa_cupy.attention(qd, kd, vd, None, q_start=q0, k_start=k0, **kw)
    dense = bsfa_cupy.attention(qd, kd, vd, None, **kw)
    for name, a, b in zip(("out", "lse", "keep"), dense, shifted):
        assert cp.array_equal(a, b), f"{name}: dense call with both offsets shifted by {k0} differs"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_start,k_start", [(None, 0), (256, 64), (0, 320), (640, 128)])
def test_block_max_scores_with_offsets(monkeypatch, backend, causal, q_start, k_start):
    import bsfa_cupy

    rng = np.random.default_rng(5)
    q, k, _ = random_inputs(rng, 2, 333, 411, 4, 1, 128, "bfloat16")
    poison_outputs(monkeypatch)
    got = cp.asnumpy(bsfa_cupy.block_max_scores(device_array(q, "bhnd"), cp.asarray(k), causal=causal,
                                                    q_start=q_start, k_start=k_start, backend=backend))
    want = ref.block_max_scores(q, k, causal=causal, q_start=q_start, k_start=k_start)
    inf = ~np.isfinite(want)
    assert np.array_equal(got[inf], want[inf]), f"{int((got[inf] != want[inf]).sum())} tiles should be -inf"
    bound = rounding_margin(q, k, causal, 128, q_start=q_start, k_start=k_start) + 1e-6
    err = np.abs(got[~inf] - want[~inf])
    lim = bound[~inf]
    assert (err <= lim).all(), f"tile max error {err.max():.3e}; {int((err > lim).sum())} tiles over the fp32 bound"


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gated", [False, True])
def test_split_calls_merge_to_the_full_call(backend, D, causal, gated):
    """Queries cut at multiples of 128 and keys at multiples of 64, every (query part, key part) pair run
    with its offsets and merged with bsfa_reference.merge_partials: each part's keep is exactly the
    full call's block, and the merged out is within the full call's error bound of the reference."""
    import bsfa_cupy

    N, Hq, Hkv, dtype = 700, 4, 2, "float16"
    rng = np.random.default_rng(D + 2 * causal + 4 * gated)
    q, k, v = random_inputs(rng, 1, N, N, Hq, Hkv, D, dtype)
    qd, kd, vd = map(cp.asarray, (q, k, v))
    tile_max = ref.block_max_scores(q, k, causal=causal)
    thr = thresholds_from_maxima(tile_max, N, N, margin=rounding_margin(q, k, causal, D)) if gated else None
    full_out, full_lse, full_keep = bsfa_cupy.attention(qd, kd, vd, thr, causal=causal, q_start=0,
                                                        return_lse=True, return_keep=True, backend=backend)
    full_keep = cp.asnumpy(full_keep)
    q_cuts, k_cuts = [0, 256, 384, N], [0, 192, 448, 512, N]
    merged = np.empty((1, N, Hq, D))
    merged_lse = np.empty((1, Hq, N))
    for q0, q1 in zip(q_cuts, q_cuts[1:]):
        outs, lses = [], []
        for k0, k1 in zip(k_cuts, k_cuts[1:]):
            o, l, kp = bsfa_cupy.attention(qd[:, q0:q1], kd[:, k0:k1], vd[:, k0:k1], thr, causal=causal,
                                           q_start=q0, k_start=k0, return_lse=True, return_keep=True,
                                           backend=backend)
            block = full_keep[:, :, q0 // BM:-(-q1 // BM), k0 // BN:-(-k1 // BN)]
            kp = cp.asnumpy(kp)
            assert np.array_equal(kp, block), (
                f"part q[{q0}:{q1}] k[{k0}:{k1}]: keep differs from the full call's block at "
                f"{int((kp != block).sum())} tiles (first {np.argwhere(kp != block)[:5].tolist()})"
            )
            outs.append(cp.asnumpy(o).astype(np.float64))
            lses.append(cp.asnumpy(l).astype(np.float64))
        merged[:, q0:q1], merged_lse[:, :, q0:q1] = ref.merge_partials(outs, lses)

    want_out, want_lse = ref.attention(q, k, v, causal=causal, keep=full_keep, return_lse=True)
    base_err = np.abs(lowp_attention(q, k, v, full_keep, causal, 1 / np.sqrt(D), dtype) - want_out).max()
    full_err = np.abs(cp.asnumpy(full_out).astype(np.float64) - want_out)
    # each part is rounded to the input dtype before the merge: one more rounding of |out_c| <= max|v|
    bound = ERR_FACTOR * base_err + 2 * EPS[dtype] * max(1.0, float(np.abs(v.astype(np.float64)).max()))
    err = np.abs(merged - want_out)
    assert (err <= bound).all(), (
        f"merged out error {err.max():.3e} > bound {bound:.3e} (full call: {full_err.max():.3e}) at "
        f"{np.unravel_index(err.argmax(), err.shape)}; {int((err > bound).sum())}/{err.size} mismatches"
    )
    live = np.isfinite(want_lse)
    assert np.array_equal(merged_lse[~live], want_lse[~live]), "empty rows must merge to lse -inf"
    lbound = 1e-4 + 2e-6 * np.abs(want_lse[live]).max()
    lerr = np.abs(merged_lse[live] - want_lse[live])
    assert lerr.max() <= lbound, f"merged lse error {lerr.max():.3e} > {lbound:.1e}, {int((lerr > lbound).sum())} rows"
    ferr = np.abs(merged_lse[live] - cp.asnumpy(full_lse)[live])
    assert ferr.max() <= lbound, f"merged lse vs the full call's: {ferr.max():.3e} > {lbound:.1e}"
