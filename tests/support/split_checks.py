"""Checks shared by the split-KV kernels' GPU tests (the mma.sync family and the sm90ws split entry).

* ``check_split_example``: one hypothesis-drawn problem against the reference;
* ``split_problem``: the ``run_case`` problem of a split test; ``split_fields``: the fields of a
  hypothesis-drawn one that do not depend on the kernel's shapes.
* ``assert_split_count_independent``: keep exactly equal over split counts, lse and out equal up to fp32
  rounding of the merge (out: one rounding of the input dtype on top).
"""
from __future__ import annotations

import numpy as np

import bsfa_reference as ref
from hypothesis import strategies as st

from tests.support.gpu import EPS, cp, poison_outputs, random_inputs, rounding_margin, run_case, thresholds_from_maxima


def check_split_example(monkeypatch, p, backend):
    """One hypothesis example ``p`` (with its num_splits) through ``run_case`` on ``backend``, its errors noted."""
    from hypothesis import note

    with monkeypatch.context() as m:
        info, (err, base_err) = run_case(p, m, backend, num_splits=p["num_splits"])
    note(f"{info}; out error {err:.2e} vs low-precision baseline {base_err:.2e}")


def split_problem(Nq, Nk, G, D=128, dtype="float16", causal=True, mode="maxima", Hkv=1, B=1, seed=0, **extra):
    return dict(dtype=dtype, D=D, causal=causal, B=B, Hkv=Hkv, Hq=Hkv * G, Nq=Nq, Nk=Nk, mode=mode,
                layouts=("contiguous",) * 3, spread=1.0, seed=seed, **extra)


def split_fields(draw, splits):
    """dtype, head dim, causal, batch, offsets, threshold mode, layouts, spread, seed and num_splits (one of
    ``splits`` or None) of a hypothesis-drawn split problem."""
    return dict(
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        D=draw(st.sampled_from([64, 128])),
        causal=draw(st.booleans()),
        B=draw(st.integers(1, 2)),
        q_start=draw(st.one_of(st.none(), st.none(), st.integers(0, 8).map(lambda t: t * ref.BLOCK_M))),
        k_start=draw(st.one_of(st.just(0), st.integers(0, 16).map(lambda t: t * ref.BLOCK_N))),
        mode=draw(st.sampled_from(["none", "scalar", "maxima", "maxima", "short"])),
        layouts=draw(st.tuples(*[st.sampled_from(["contiguous", "bhnd", "padded"])] * 3)),
        spread=draw(st.sampled_from([0.5, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        num_splits=draw(st.sampled_from(splits)),
    )


def split_count_results(monkeypatch, Nq, Nk, G, causal, calls):
    """{label: (out, lse, keep)} as NumPy for one random bfloat16 problem (B=1, Hkv=2, D=128, thresholds that
    skip) run through each ``calls[label]`` (keyword arguments of ``bsfa_cupy.attention``)."""
    import bsfa_cupy

    rng = np.random.default_rng(Nq + Nk)
    q, k, v = random_inputs(rng, 1, Nq, Nk, 2 * G, 2, 128, "bfloat16")
    tile_max = ref.block_max_scores(q, k, causal=causal)
    thr = thresholds_from_maxima(tile_max, Nq, Nk, margin=rounding_margin(q, k, causal, 128))
    qd, kd, vd = (cp.asarray(x) for x in (q, k, v))
    poison_outputs(monkeypatch)
    results = {}
    for label, kw in calls.items():
        res = bsfa_cupy.attention(qd, kd, vd, thr, causal=causal, return_lse=True, return_keep=True, **kw)
        results[label] = tuple(cp.asnumpy(x) for x in res)
    return results


def assert_split_count_independent(results, base):
    """Every entry of ``results`` against ``results[base]``: keep exactly, lse and out up to rounding."""
    out1, lse1, keep1 = (x.astype(np.float64) if x.dtype != bool else x for x in results[base])
    assert keep1.any() and not keep1.all(), "thresholds should keep some tiles and skip others"
    live = np.isfinite(lse1)
    for label, (out, lse, keep) in results.items():
        assert np.array_equal(keep, keep1), f"{label}: keep differs from {base}"
        assert np.array_equal(np.isfinite(lse), live), f"{label}: other empty rows than {base}"
        lerr = np.abs(lse[live] - lse1[live]).max(initial=0)
        assert lerr <= 1e-5 * max(1.0, np.abs(lse1[live]).max(initial=1)), f"{label}: lse differs by {lerr:.3e}"
        err = np.abs(out.astype(np.float64) - out1)
        tol = 2 * EPS["bfloat16"] * max(1.0, float(np.abs(out1).max()))
        assert err.max() <= tol, f"{label}: out differs by {err.max():.3e} at {int((err > tol).sum())} entries"
