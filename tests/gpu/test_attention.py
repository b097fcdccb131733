"""The kernel against the float64 reference on the GPU: hypothesis over shapes, layouts and thresholds."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import bsfa_reference as ref
from tests.support.gpu import (
    assert_nonfinite_like_reference,
    cp,
    device_array,
    planted_nonfinite,
    poison_outputs,
    random_inputs,
    requires_gpu,
    run_case,
    without_head_pairs,
    thresholds_from_maxima,
)

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.mark.parametrize("D", [32, 64, 96, 128])
def test_backend_picks_the_kernel(backend, D):
    from bsfa_cupy import _kernels, ops

    if backend == "sm90" and D not in (64, 128):
        with pytest.raises(ValueError, match=r"backend 'sm90': expected head_dim in \(64, 128\)"):
            ops._module(bsfa_cupy_backend(backend), "float16", D, True, cp.cuda.Device().id)
        return
    mod = ops._module(bsfa_cupy_backend(backend), "float16", D, True, cp.cuda.Device().id)
    from bsfa_cupy import _tma

    hopper_auto = "sm90ws" if _tma.available() else "sm90"
    want = backend if backend == "sm90" else hopper_auto if backend == "auto" and D in (64, 128) else "sm80"
    assert mod.key.arch == want, f"backend {backend!r}, head dim {D}: ran {mod.key.name()}"
    assert isinstance(mod, _kernels.Module) and mod.fwd.threads > 0 and mod.block_max.threads > 0


def bsfa_cupy_backend(name):
    import bsfa_cupy

    return bsfa_cupy.Backend(name)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(["float16", "bfloat16"]))
    D = draw(st.sampled_from([64, 128, 64, 128, 32, 96]))
    causal = draw(st.booleans())
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    Nk = draw(st.integers(1, 700))
    Nq = draw(st.one_of(st.integers(1, 700), st.just(Nk)))
    mode = draw(st.sampled_from(["none", "scalar", "maxima", "maxima", "maxima", "short"]))
    layouts = draw(st.tuples(*[st.sampled_from(["contiguous", "bhnd", "padded"])] * 3))
    spread = draw(st.sampled_from([0.5, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(dtype=dtype, D=D, causal=causal, B=B, Hkv=Hkv, Hq=Hkv * group, Nq=Nq, Nk=Nk, mode=mode,
                layouts=layouts, spread=spread, seed=seed)


@given(problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # examples: profile
def test_kernel_matches_reference(monkeypatch, backend, p):
    with monkeypatch.context() as m:
        info, (err, base_err) = run_case(p, m, backend)
    note(f"{info}; out error {err:.2e} vs low-precision baseline {base_err:.2e}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_every_variant_odd_sizes(monkeypatch, backend, dtype, D, causal):
    """Every compiled variant on a ragged, GQA, batched problem with tile-maxima thresholds."""
    p = dict(dtype=dtype, D=D, causal=causal, B=2, Hkv=2, Hq=4, Nq=577, Nk=641, mode="maxima",
             layouts=("padded", "bhnd", "contiguous"), spread=1.0, seed=D + causal)
    run_case(p, monkeypatch, backend)


@pytest.mark.parametrize("Nq,Nk", [(300, 100), (1, 1), (1, 700), (200, 63), (128, 64)])
def test_edge_shapes(monkeypatch, backend, Nq, Nk):
    """Causal rows with no valid key (Nq > Nk), a single query/key, Nk < 64, exact tiles."""
    p = dict(dtype="float16", D=64, causal=True, B=1, Hkv=1, Hq=2, Nq=Nq, Nk=Nk, mode="maxima",
             layouts=("contiguous",) * 3, spread=1.0, seed=Nq * 1000 + Nk)
    run_case(p, monkeypatch, backend)


@pytest.mark.parametrize("B,Hkv,Hq,causal", [(3, 1, 4, True), (3, 1, 2, True), (1, 5, 5, True), (2, 3, 9, False)])
def test_dispatch_order_covers_every_tile(monkeypatch, backend, B, Hkv, Hq, causal):
    """CTAs take (batch, head) pairs 4, 2 or 1 at a time (what divides B * Hq): each width once."""
    p = dict(dtype="float16", D=64, causal=causal, B=B, Hkv=Hkv, Hq=Hq, Nq=333, Nk=400, mode="maxima",
             layouts=("contiguous",) * 3, spread=1.0, seed=B * 100 + Hq)
    run_case(p, monkeypatch, backend)


@pytest.mark.parametrize("thr", [np.inf, -np.inf])
def test_infinite_thresholds(monkeypatch, backend, thr):
    """+inf keeps exactly the diagonal tiles, -inf keeps everything (equals dense bitwise, on the entries that share
    the dense ones' arithmetic)."""
    import bsfa_cupy

    without_head_pairs(monkeypatch)
    rng = np.random.default_rng(3)
    q, k, v = random_inputs(rng, 1, 640, 640, 4, 2, 128, "float16")
    qd, kd, vd = map(cp.asarray, (q, k, v))
    out, keep = bsfa_cupy.attention(qd, kd, vd, thr, return_keep=True, backend=backend)
    _, ref_keep = ref.attention(q, k, v, thr, return_keep=True)
    np.testing.assert_array_equal(cp.asnumpy(keep), ref_keep)
    if thr == -np.inf:
        dense = bsfa_cupy.attention(qd, kd, vd, backend=backend)
        assert cp.array_equal(out, dense), "thresholds=-inf must equal dense bitwise"


def test_deterministic_and_no_nan(backend):
    import bsfa_cupy

    rng = np.random.default_rng(11)
    q, k, v = random_inputs(rng, 2, 1000, 1100, 8, 2, 128, "bfloat16")
    qd, kd, vd = map(cp.asarray, (q, k, v))
    thr = thresholds_from_maxima(ref.block_max_scores(q, k), 1000, 1100)
    runs = [bsfa_cupy.attention(qd, kd, vd, thr, return_lse=True, return_keep=True, backend=backend)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert cp.array_equal(a, b), "two runs on the same inputs differ"
    assert not cp.isnan(runs[0][0]).any() and not cp.isnan(runs[0][1]).any()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_block_max_scores_matches_reference(monkeypatch, backend, causal, dtype):
    import bsfa_cupy

    rng = np.random.default_rng(5)
    q, k, _ = random_inputs(rng, 2, 333, 777, 4, 1, 64, dtype)
    poison_outputs(monkeypatch)
    got = cp.asnumpy(bsfa_cupy.block_max_scores(device_array(q, "bhnd"), cp.asarray(k), causal=causal,
                                                    backend=backend))
    want = ref.block_max_scores(q, k, causal=causal)
    assert got.dtype == np.float32
    inf = ~np.isfinite(want)
    assert np.array_equal(got[inf], want[inf]), f"{int((got[inf] != want[inf]).sum())} tiles should be -inf"
    bound = ref.block_max_scores(np.abs(q.astype(np.float64)), np.abs(k.astype(np.float64)), causal=causal)
    err = np.abs(got[~inf] - want[~inf])
    lim = bound[~inf] * 64 * 2.0**-22 + 1e-6
    assert (err <= lim).all(), f"tile max error {err.max():.3e}; {int((err > lim).sum())} tiles over the fp32 bound"


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_nonfinite_inputs_reach_exactly_the_reference_rows(monkeypatch, backend, D, gated, causal):
    """NaN / ±inf in q, k and v propagate like the reference defines: the same outputs and lse are
    non-finite (NaN lse exactly where the reference's is NaN), every other entry is accurate."""
    import bsfa_cupy

    q, k, v, thr = planted_nonfinite(D * 4 + 2 * gated + causal, (1, 333, 400, 4, 2, D), causal, gated,
                                     q_at=[(0, 200, 1, 5), (0, 17, 3, 0)], k_at=[(0, 150, 0, 3), (0, 390, 1, 7)],
                                     v_at=[(0, 70, 1, 2), (0, 300, 0, 0)])
    poison_outputs(monkeypatch)
    res = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), thr, causal=causal, return_lse=True, return_keep=True,
                              backend=backend)
    assert_nonfinite_like_reference(q, k, v, causal, *(cp.asnumpy(x) for x in res))
