"""The calibration code paths that run without a GPU.

* ``sample_thresholds`` is array-module generic (``xp``); with NumPy and float32 maxima (what the
  GPU hands it) it must give the float64 path's midpoints exactly.
* ``bsfa_cupy.Calibrator``'s glue (its ``_xp`` and ``_tile_max`` hooks into the reference's
  update) driven with NumPy in place of CuPy must equal the reference fed the same maxima.
* ``bsfa_cupy.tools.dumps.HostCalibrator`` (the CLI's CPU path) takes maxima in bands of query tiles.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import bsfa_reference as ref
import bsfa_cupy
from bsfa_cupy.tools.dumps import HostCalibrator, banded_block_max

SHAPES = [(300, 300), (300, 700), (700, 300), (129, 129), (1, 500)]


def _qk(rng, Nq, Nk, B=2, Hq=2, Hkv=1, D=16, dtype=np.float16):
    return (rng.standard_normal((B, Nq, Hq, D)).astype(dtype), rng.standard_normal((B, Nk, Hkv, D)).astype(dtype))


@pytest.mark.parametrize("Nq,Nk", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_float32_selection_equals_float64_selection(Nq, Nk, causal):
    rng = np.random.default_rng(Nq * 7 + Nk)
    q, k = _qk(rng, Nq, Nk)
    tm32 = ref.block_max_scores(q, k, causal=causal).astype(np.float32)
    ks = (1, 2, 5, 9)
    got, pos = ref.sample_thresholds(tm32, ks, Nq, Nk, 128, 64, xp=np)
    want, want_pos = ref.sample_thresholds(tm32.astype(np.float64), ks, Nq, Nk, 128, 64)
    assert got.dtype == np.float64 and got.shape == (len(ks),) + tm32.shape[:3]
    np.testing.assert_array_equal(got, want)  # NaN where too few candidates, in the same places
    np.testing.assert_array_equal(pos, want_pos)


class _NumpyGpuCalibrator(bsfa_cupy.Calibrator):
    """bsfa_cupy.Calibrator with NumPy as its array module and float32 reference maxima as its
    'kernel' output: everything but the CuPy calls themselves."""

    _xp = np

    def _tile_max(self, q, k):
        return ref.block_max_scores(q, k, causal=self.causal, softmax_scale=self.softmax_scale).astype(np.float32)


class _Fed(ref.Calibrator):
    """The reference rule fed the same float32 maxima (as bsfa_cupy.tools.demo does with the kernel's)."""

    def _tile_max(self, q, k):
        return ref.block_max_scores(q, k, causal=self.causal, softmax_scale=self.softmax_scale).astype(np.float32)


@pytest.mark.parametrize("reduce,causal", [("mean", True), ("median", False)])
def test_gpu_calibrator_glue_equals_reference_on_the_same_maxima(reduce, causal):
    rng = np.random.default_rng(5)
    gpu_like = _NumpyGpuCalibrator([1, 3, 40], causal=causal, reduce=reduce)
    fed = _Fed([1, 3, 40], causal=causal, reduce=reduce)
    plain = ref.Calibrator([1, 3, 40], causal=causal, reduce=reduce)
    for Nq, Nk in SHAPES:
        q, k = _qk(rng, Nq, Nk)
        for cal in (gpu_like, fed, plain):
            cal.update(q, k)
    got = gpu_like.thresholds()
    np.testing.assert_array_equal(got, fed.thresholds())
    assert gpu_like.num_samples == plain.num_samples == 2 * len(SHAPES)
    # and the float64 reference agrees up to float32 rounding of the maxima
    np.testing.assert_allclose(got, plain.thresholds(), rtol=1e-5, atol=1e-5)
    assert np.isinf(got[2]).all()  # k = 40: never more than 40 candidates at these lengths


def test_gpu_calibrator_has_the_kernel_tiles_only():
    with pytest.raises(ValueError, match=r"expected the kernel's 128x64 tiles, got 64x64"):
        bsfa_cupy.Calibrator([16], block_m=64)
    cal = bsfa_cupy.Calibrator([16, 32], reduce="median", causal=False)  # constructing needs no CuPy
    assert (cal.k_values, cal.reduce, cal.causal, cal.block_m, cal.block_n) == ((16, 32), "median", False, 128, 64)
    with pytest.raises(ValueError, match="reduce"):
        bsfa_cupy.Calibrator([16], reduce="max")


@pytest.mark.parametrize("Nq,Nk,causal", [(300, 700, True), (700, 300, True), (1, 500, True), (300, 300, False)])
def test_banded_maxima_equal_the_reference(Nq, Nk, causal):
    rng = np.random.default_rng(11)
    q, k = _qk(rng, Nq, Nk, B=1, dtype=ml_dtypes.bfloat16)
    want = ref.block_max_scores(q, k, causal=causal)
    for budget in (1, 3 * 128 * 700 * 2, 2**40):  # one query tile a band, a few, everything at once
        got = banded_block_max(q, k, causal, None, 128, 64, budget)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_allclose(got, want, rtol=1e-12)  # einsum's summation order may differ by shape


def test_host_calibrator_equals_reference(monkeypatch):
    monkeypatch.setattr(HostCalibrator, "budget", 1)
    rng = np.random.default_rng(12)
    host, plain = HostCalibrator([1, 4]), ref.Calibrator([1, 4])
    for Nq, Nk in SHAPES:
        q, k = _qk(rng, Nq, Nk)
        host.update(q, k)
        plain.update(q, k)
    np.testing.assert_allclose(host.thresholds(), plain.thresholds(), rtol=1e-6)


@pytest.mark.parametrize("B,Hq,Hkv", [(2, 4, 2), (1, 3, 3), (1, 4, 1)])
@pytest.mark.parametrize("Nq,Nk,causal", [(300, 700, True), (700, 300, True), (333, 333, False)])
def test_banded_maxima_equal_the_reference_for_every_head_grouping(B, Hq, Hkv, Nq, Nk, causal):
    rng = np.random.default_rng(13)
    q, k = _qk(rng, Nq, Nk, B=B, Hq=Hq, Hkv=Hkv)
    want = ref.block_max_scores(q, k, causal=causal, softmax_scale=0.3)
    for budget in (1, 200_000, 2**40):
        got = banded_block_max(q, k, causal, 0.3, 128, 64, budget)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_band_stays_within_the_memory_budget():
    """Peak memory of the banded maxima, everything NumPy allocates counted, minus the returned
    (B, Hq, nQ, nK) array, at most the budget, and not far below it (bands are not needlessly small)."""
    import tracemalloc

    rng = np.random.default_rng(14)
    q, k = _qk(rng, 1024, 1024, B=1, Hq=8, Hkv=2, D=64)
    budget = 3 * 2**20
    tracemalloc.start()
    try:
        got = banded_block_max(q, k, True, None, 128, 64, budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    used = peak - got.nbytes
    assert budget / 3 <= used <= budget, (used, budget)
    np.testing.assert_allclose(got, ref.block_max_scores(q, k), rtol=1e-12)


def test_the_default_band_fits_a_long_context_model_layer():
    """Hq=32, Hkv=8, D=128 at N=64K: the band the CLI's CPU path plans stays within its budget."""
    from bsfa_cupy.tools.dumps import band_plan

    rows, cols, nbytes = band_plan(Hq=32, Hkv=8, D=128, Nq=65536, Nk=65536, block_m=128, block_n=64,
                                   budget=HostCalibrator.budget)
    assert HostCalibrator.budget == 256 * 2**20
    assert nbytes <= HostCalibrator.budget and rows % 128 == 0 and cols % 64 == 0 and cols >= 64
