"""bsfa_fwd_headpair, the sm90ws entry that takes two query heads of a GQA group a CTA, each consumer warpgroup a
whole 128-row BSFA tile of its own head that decides its own gates: against the float64 reference (keep up to fp32
rounding at the threshold, out and lse relative to the low-precision baseline), dense and with thresholds, over
dtypes, head dims 64 and 128, causal or not, ragged lengths, Nq != Nk, GQA groups of 2 to 8, batches and layouts;
non-finite inputs; infinite thresholds. Every call must launch the entry once. Its split form
(bsfa_fwd_split_headpair, chunks of more than 64 rows) the same way at 1 to 64 splits, and its results independent
of the split count up to the merge's rounding."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bsfa_reference as ref
from tests.gpu.conftest import _is_hopper
from tests.support.gpu import (assert_nonfinite_like_reference, cp, planted_nonfinite, poison_outputs,
                               random_inputs, requires_gpu, run_case)
from tests.support.split_checks import assert_split_count_independent, split_count_results

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not _is_hopper(), reason="the sm90ws kernel needs compute capability 9.0")]


@pytest.fixture
def launches(monkeypatch):
    """sm90ws modules with every unsplit call of an even GQA group, dense or not, on bsfa_fwd_headpair; the
    list its launches append to."""
    import bsfa_cupy
    from bsfa_cupy import ops

    real, seen = ops.get_module, []

    def get_module(key, backend, device_id):
        mod = real(key, backend, device_id)
        if key.arch != "sm90ws":
            return mod
        spied = {}
        for field in ("fwd_headpair", "fwd_split_headpair"):
            kern = getattr(mod, field)
            assert kern is not None, f"{key.name()}: no {field}"

            def spy(*args, _fn=kern.fn, _name=field, **kw):
                seen.append(_name)
                return _fn(*args, **kw)

            spied[field] = dataclasses.replace(kern, fn=spy)
        return dataclasses.replace(mod, **spied).head_pairs(dense=True)

    monkeypatch.setattr(ops, "get_module", get_module)
    bsfa_cupy.clear_plan_cache()
    yield seen
    bsfa_cupy.clear_plan_cache()


def _case(monkeypatch, launches, entry="fwd_headpair", call=None, **p):
    case = dict(layouts=("contiguous",) * 3, spread=1.0, seed=0)
    case.update(p)
    launches.clear()
    info, _ = run_case(case, monkeypatch, "sm90ws", **(call or {}))
    assert launches == [entry], f"expected one launch of {entry}, got {launches} ({info})"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["none", "maxima"])
@pytest.mark.parametrize("shape", [(2, 577, 641, 4, 2), (1, 1100, 1300, 8, 2), (1, 300, 100, 2, 1),
                                   (3, 200, 700, 8, 1)], ids=lambda s: "x".join(map(str, s)))
def test_head_pairs_match_reference(monkeypatch, launches, dtype, D, causal, mode, shape):
    B, Nq, Nk, Hq, Hkv = shape
    _case(monkeypatch, launches, dtype=dtype, D=D, causal=causal, B=B, Nq=Nq, Nk=Nk, Hq=Hq, Hkv=Hkv, mode=mode,
          layouts=("padded", "bhnd", "contiguous"), seed=Nq * 31 + Nk + D + causal)


@pytest.mark.parametrize("mode", ["scalar", "short"])
@pytest.mark.parametrize("Nq,Nk", [(1, 700), (128, 64), (200, 63), (129, 1000)])
def test_head_pairs_edges(monkeypatch, launches, mode, Nq, Nk):
    """One query row, exact tiles, fewer keys than a key tile, one row past a tile; scalar thresholds and
    tables shorter than the query tile positions."""
    _case(monkeypatch, launches, dtype="float16", D=128, causal=True, B=1, Nq=Nq, Nk=Nk, Hq=4, Hkv=2, mode=mode,
          seed=Nq * 1000 + Nk)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [64, 128])
def test_head_pairs_one_sign_scores(monkeypatch, launches, dtype, D):
    """Every score of one K/V head's query heads negative (and of the other's mostly positive), thresholds
    from the tile maxima: the gate compares negative maxima with negative thresholds, which the random inputs
    of the other cases rarely reach."""
    _case(monkeypatch, launches, dtype=dtype, D=D, causal=True, B=1, Nq=700, Nk=900, Hq=4, Hkv=2, mode="maxima",
          k_shift=(-12.0, 3.0), seed=D + len(dtype))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_head_pairs_nonfinite_inputs(monkeypatch, launches, D, gated, causal):
    """NaN / ±inf in q, k and v reach exactly the rows the reference defines."""
    import bsfa_cupy

    q, k, v, thr = planted_nonfinite(D * 4 + 2 * gated + causal, (1, 333, 400, 4, 2, D), causal, gated,
                                     q_at=[(0, 200, 1, 5), (0, 17, 3, 0)], k_at=[(0, 150, 0, 3), (0, 390, 1, 7)],
                                     v_at=[(0, 70, 1, 2), (0, 300, 0, 0)])
    poison_outputs(monkeypatch)
    res = bsfa_cupy.attention(*map(cp.asarray, (q, k, v)), thr, causal=causal, return_lse=True, return_keep=True,
                              backend="sm90ws")
    assert launches == ["fwd_headpair"], f"expected one launch of bsfa_fwd_headpair, got {launches}"
    assert_nonfinite_like_reference(q, k, v, causal, *(cp.asnumpy(x) for x in res))


@pytest.mark.parametrize("thr", [np.inf, -np.inf])
def test_head_pairs_infinite_thresholds(launches, thr):
    """+inf keeps exactly the diagonal tiles; -inf keeps everything and equals the dense call bitwise (the same
    entry, the gate's maxima against the softmax's own)."""
    import bsfa_cupy

    rng = np.random.default_rng(3)
    q, k, v = random_inputs(rng, 1, 640, 640, 4, 2, 128, "float16")
    qd, kd, vd = map(cp.asarray, (q, k, v))
    out, keep = bsfa_cupy.attention(qd, kd, vd, thr, return_keep=True, backend="sm90ws")
    _, ref_keep = ref.attention(q, k, v, thr, return_keep=True)
    np.testing.assert_array_equal(cp.asnumpy(keep), ref_keep)
    if thr == -np.inf:
        dense = bsfa_cupy.attention(qd, kd, vd, backend="sm90ws")
        assert cp.array_equal(out, dense), "thresholds=-inf must equal dense bitwise"
    assert launches == ["fwd_headpair"] * (1 if thr == np.inf else 2), f"launches: {launches}"


@pytest.mark.parametrize("num_splits", [1, 2, 3, 64])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Nq,causal,dtype", [(65, True, "float16"), (128, False, "bfloat16"),
                                             (300, True, "bfloat16")])
def test_split_head_pairs_match_reference(monkeypatch, launches, num_splits, D, Nq, causal, dtype):
    """Chunks of more than 64 rows against a longer cache, split over the keys (64: more splits than a split has
    key blocks, so some are empty)."""
    _case(monkeypatch, launches, entry="fwd_split_headpair", call=dict(num_splits=num_splits), dtype=dtype, D=D,
          causal=causal, B=1, Nq=Nq, Nk=2100, Hq=8, Hkv=2, mode="maxima", seed=Nq + num_splits + D)


@pytest.mark.parametrize("causal", [True, False])
def test_split_head_pairs_do_not_depend_on_the_split_count(monkeypatch, launches, causal):
    """keep exactly equal; lse and out up to the fp32 rounding of the merge."""
    calls = {f"num_splits={s}": dict(backend="sm90ws", num_splits=s) for s in (1, 2, 3, 7, 64)}
    assert_split_count_independent(split_count_results(monkeypatch, 129, 2100, 4, causal, calls), "num_splits=1")
    assert launches == ["fwd_split_headpair"] * len(calls), f"launches: {launches}"
