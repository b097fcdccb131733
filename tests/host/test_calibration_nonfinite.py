"""bsfa_cupy.Calibrator refuses NaN / ±inf in q and k before the kernel runs (its maxima would
ignore NaN scores and bias the thresholds without a sign). Without a GPU: the count runs on
NumPy arrays, and the device path is driven with NumPy standing in for CuPy."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import bsfa_cupy
import bsfa_cupy._arrays
import bsfa_cupy.calibration

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_nonfinite_on_bits_and_views(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 3, 8)).astype(dtype)
    x[0, 2, 2, 3] = np.nan
    x[1, 5, 0, 0] = np.inf
    x[1, 6, 1, 7] = -np.inf
    big = {np.float16: 65504.0, ml_dtypes.bfloat16: 3.3e38}.get(dtype, 1e30)
    x[0, 0, 0, 0] = big  # the largest finite values are not inf
    x[0, 0, 0, 1] = -big
    x[0, 0, 0, 2] = 1e-42 if dtype in (np.float32, np.float64) else 0.0
    assert bsfa_cupy.calibration.count_nonfinite(x, np) == 3
    assert bsfa_cupy.calibration.count_nonfinite(x[:, ::2], np) == 2  # strided: rows 2 and 6 of the ones above
    assert bsfa_cupy.calibration.count_nonfinite(x.transpose(1, 0, 3, 2), np) == 3
    assert bsfa_cupy.calibration.count_nonfinite(x[:, :1], np) == 0


def test_count_nonfinite_of_integers_is_zero():
    assert bsfa_cupy.calibration.count_nonfinite(np.full((3, 4), 0x7C00, np.int16), np) == 0


class _DeviceArray:
    """Stands for a CuPy / torch / JAX array: not a numpy.ndarray; ``size`` a method, as torch's."""

    def __init__(self, a):
        self.a = a
        self.ndim, self.shape = a.ndim, a.shape

    def size(self):
        return self.a.shape


@pytest.fixture
def device_calibrator(monkeypatch):
    """bsfa_cupy.Calibrator whose CuPy is NumPy and whose kernel must not be reached."""
    monkeypatch.setattr(bsfa_cupy.calibration, "cupy", lambda: np)
    monkeypatch.setattr(bsfa_cupy._arrays, "to_cupy", lambda x, name, frame=None: x.a)

    class Calibrator(bsfa_cupy.Calibrator):
        def _tile_max(self, q, k):
            raise AssertionError("the kernel ran on non-finite inputs")

    return Calibrator([1, 2])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("which", ["q", "k"])
def test_gpu_calibrator_refuses_nonfinite_device_arrays(device_calibrator, dtype, which):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 256, 4, 64)).astype(dtype)
    k = rng.standard_normal((2, 256, 2, 64)).astype(dtype)
    x = q if which == "q" else k
    x[1, 200, 1, 5] = np.nan
    x[0, 3, 0, 63] = -np.inf
    with pytest.raises(ValueError, match=rf"^{which}: expected finite values, got 2 NaN or ±inf of {x.size} in "
                                         rf"shape \(2, 256, {x.shape[2]}, 64\)"):
        device_calibrator.update(_DeviceArray(q), _DeviceArray(k))
    assert device_calibrator.num_samples == 0


def test_gpu_calibrator_counts_host_arrays_on_the_host(device_calibrator):
    q = np.zeros((1, 128, 2, 64), np.float16)
    k = np.zeros((1, 128, 1, 64), np.float16)
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^k: expected finite values, got 1 NaN"):
        device_calibrator.update(q, k)
