"""Bad inputs to bsfa_reference raise a clear ValueError / TypeError."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import bsfa_reference as R
from tests.support.reference_helpers import make_qkv


@pytest.fixture
def qkv():
    return make_qkv(2, 40, 50, 4, 2, 8, seed=0)


SMALL = dict(block_m=16, block_n=8)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["attention", "block_max_scores"])
def test_rank(qkv, fn):
    q, k, v = qkv
    call = (lambda q, k: R.attention(q, k, v)) if fn == "attention" else R.block_max_scores
    with pytest.raises(ValueError, match="q: expected rank 4"):
        call(q[0], k)
    with pytest.raises(ValueError, match="k: expected rank 4"):
        call(q, k[0])
    with pytest.raises(ValueError, match="q: expected rank 4"):
        call(q[..., None], k)


def test_v_shape(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="v: expected shape"):
        R.attention(q, k, v[0])
    with pytest.raises(ValueError, match="v: expected shape"):
        R.attention(q, k, v[:, :-1])  # Nk of v differs from k
    with pytest.raises(ValueError, match="v: expected shape"):
        R.attention(q, k, v[..., :4])  # head_dim of v differs
    with pytest.raises(ValueError, match="v: expected shape"):
        R.attention(q, k, v[:, :, :1])  # heads of v differ


@pytest.mark.parametrize("fn", ["attention", "block_max_scores"])
def test_mismatched_batch_dim_heads(qkv, fn):
    q, k, v = qkv

    def call(q, k):
        if fn == "attention":
            return R.attention(q, k, k)
        return R.block_max_scores(q, k)

    with pytest.raises(ValueError, match="expected batch 2"):
        call(q, k[:1])
    with pytest.raises(ValueError, match="expected head_dim 8"):
        call(q, k[..., :4])
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        call(q, np.concatenate([k, k[:, :, :1]], axis=2))
    with pytest.raises(ValueError, match=r"q heads \(2\) must be a multiple of k/v heads \(4\)"):
        call(q[:, :, :2], np.concatenate([k, k], axis=2))
    with pytest.raises(ValueError, match="no empty dimension"):
        call(q[:, :0], k)
    with pytest.raises(ValueError, match="no empty dimension"):
        call(q, k[:, :0])


# ---------------------------------------------------------------------------------------------
# dtypes and array types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.complex64, np.complex128, np.bool_, object])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_unsupported_dtype(qkv, dtype, which):
    arrays = dict(zip("qkv", qkv))
    arrays[which] = arrays[which].astype(dtype)
    with pytest.raises(TypeError, match=f"{which}: expected dtype in"):
        R.attention(arrays["q"], arrays["k"], arrays["v"])
    if which != "v":
        with pytest.raises(TypeError, match=f"{which}: expected dtype in"):
            R.block_max_scores(arrays["q"], arrays["k"])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_supported_dtypes(qkv, dtype):
    q, k, v = (x.astype(dtype) for x in qkv)
    out, lse = R.attention(q, k, v, 0.0, return_lse=True, **SMALL)
    assert out.dtype == np.float64 and lse.dtype == np.float64


def test_non_array_inputs(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="q: expected a numpy.ndarray, got list"):
        R.attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="v: expected a numpy.ndarray"):
        R.attention(q, k, v.tolist())
    with pytest.raises(TypeError, match="k: expected a numpy.ndarray"):
        R.block_max_scores(q, 3.0)

    class FakeDevice:
        __cuda_array_interface__ = {}

    with pytest.raises(TypeError, match="host numpy.ndarray"):
        R.attention(FakeDevice(), k, v)


# ---------------------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 2), (5, 2), (4,), (4, 0), (1, 4, 2), (2, 4)])
def test_threshold_shape(qkv, shape):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"thresholds: expected shape \(4, T\)"):
        R.attention(q, k, v, np.zeros(shape, np.float32))


@pytest.mark.parametrize("thr", [math.nan, np.float32("nan"), np.float64("nan"), np.array(math.nan),
                                 np.array([[0.0, math.nan]] * 4), np.array([[math.nan]] * 4, np.float32)])
def test_threshold_nan(qkv, thr):
    q, k, v = qkv
    with pytest.raises(ValueError, match="NaN is not a threshold"):
        R.attention(q, k, v, thr)


@pytest.mark.parametrize("thr,match", [
    (True, "got bool"),
    (np.bool_(False), "got bool"),
    ("0.5", "got str"),
    ([[0.0]] * 4, "got list"),
    (np.zeros((4, 2), np.complex64), "expected a float array"),
    (np.zeros((4, 2), bool), "expected a float array"),
    (1 + 2j, "got complex"),
])
def test_threshold_type(qkv, thr, match):
    q, k, v = qkv
    with pytest.raises(TypeError, match=match):
        R.attention(q, k, v, thr)


@pytest.mark.parametrize("thr", [math.inf, -math.inf, np.float32(np.inf), np.full((4, 3), -np.inf),
                                 np.array([[np.inf, -np.inf]] * 4), np.zeros((4, 1), np.float64),
                                 np.zeros((4, 1), np.int32), np.zeros((4, 2), ml_dtypes.bfloat16), 0, np.int64(1)])
def test_threshold_accepted(qkv, thr):
    q, k, v = qkv
    out = R.attention(q, k, v, thr, **SMALL)
    assert np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# keep
# ---------------------------------------------------------------------------------------------


def test_keep_with_thresholds(qkv):
    q, k, v = qkv
    keep = np.ones((2, 4, 3, 7), bool)
    for thr in (0.0, -math.inf, np.zeros((4, 2), np.float32)):
        with pytest.raises(ValueError, match="pass either thresholds or keep"):
            R.attention(q, k, v, thr, keep=keep, **SMALL)


@pytest.mark.parametrize("shape", [(2, 4, 3, 6), (2, 4, 4, 7), (1, 4, 3, 7), (2, 2, 3, 7), (4, 3, 7), (2, 4, 3, 7, 1)])
def test_keep_shape(qkv, shape):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"keep: expected shape \(2, 4, 3, 7\)"):
        R.attention(q, k, v, keep=np.ones(shape, bool), **SMALL)


@pytest.mark.parametrize("keep,match", [
    (np.ones((2, 4, 3, 7), np.int8), "keep: expected dtype bool"),
    (np.ones((2, 4, 3, 7), np.float32), "keep: expected dtype bool"),
    (np.ones((2, 4, 3, 7), bool).tolist(), "keep: expected a numpy bool array"),
    (True, "keep: expected a numpy bool array"),
])
def test_keep_type(qkv, keep, match):
    q, k, v = qkv
    with pytest.raises(TypeError, match=match):
        R.attention(q, k, v, keep=keep, **SMALL)


# ---------------------------------------------------------------------------------------------
# block sizes and softmax_scale
# ---------------------------------------------------------------------------------------------

BAD_BLOCKS = [(0, ValueError, "expected a positive int, got 0"),
              (-16, ValueError, "expected a positive int, got -16"),
              (16.0, TypeError, "expected a positive int, got float"),
              (128.9, TypeError, "expected a positive int, got float 128.9"),
              (np.float64(16.0), TypeError, "expected a positive int, got float64"),
              (True, TypeError, "expected a positive int, got bool"),
              (np.bool_(True), TypeError, "expected a positive int, got bool"),
              ("16", TypeError, "expected a positive int, got str"),
              (None, TypeError, "expected a positive int, got NoneType")]


@pytest.mark.parametrize("value,exc,match", BAD_BLOCKS)
@pytest.mark.parametrize("name", ["block_m", "block_n"])
def test_bad_block_sizes(qkv, name, value, exc, match):
    q, k, v = qkv
    kw = {name: value}
    with pytest.raises(exc, match=f"{name}: {match}"):
        R.attention(q, k, v, **kw)
    with pytest.raises(exc, match=f"{name}: {match}"):
        R.block_max_scores(q, k, **kw)
    with pytest.raises(exc, match=f"{name}: {match}"):
        R.Calibrator([1], **kw)


def test_numpy_int_block_sizes_accepted(qkv):
    q, k, v = qkv
    a = R.attention(q, k, v, 0.0, block_m=np.int64(16), block_n=np.int32(8), return_keep=True)
    b = R.attention(q, k, v, 0.0, block_m=16, block_n=8, return_keep=True)
    assert (a[1] == b[1]).all() and (a[0] == b[0]).all()


@pytest.mark.parametrize("scale,exc,match", [
    ("0.1", TypeError, "softmax_scale: expected a float or None"),
    (True, TypeError, "softmax_scale: expected a float or None"),
    (1j, TypeError, "softmax_scale: expected a float or None"),
    (np.bool_(True), TypeError, "softmax_scale: expected a float or None"),
    (np.complex128(0.5), TypeError, "softmax_scale: expected a float or None"),
    (math.nan, ValueError, "softmax_scale: expected a finite float"),
    (math.inf, ValueError, "softmax_scale: expected a finite float"),
    (-math.inf, ValueError, "softmax_scale: expected a finite float"),
    (0, ValueError, r"softmax_scale: expected a finite float > 0 or None, got 0.0"),
    (0.0, ValueError, r"softmax_scale: expected a finite float > 0 or None, got 0.0"),
    (-0.0, ValueError, r"softmax_scale: expected a finite float > 0 or None, got -0.0"),
    (-0.125, ValueError, r"softmax_scale: expected a finite float > 0 or None, got -0.125"),
    (np.float32(-1), ValueError, r"softmax_scale: expected a finite float > 0 or None, got -1.0"),
    (-1, ValueError, r"softmax_scale: expected a finite float > 0 or None, got -1.0"),
])
def test_bad_softmax_scale(qkv, scale, exc, match):
    q, k, v = qkv
    with pytest.raises(exc, match=match):
        R.attention(q, k, v, softmax_scale=scale)
    with pytest.raises(exc, match=match):
        R.block_max_scores(q, k, softmax_scale=scale)
    cal = R.Calibrator([1], softmax_scale=scale)
    with pytest.raises(exc, match=match):
        cal.update(q, k)


def test_positive_softmax_scales_accepted(qkv):
    q, k, v = qkv
    for scale in (1, np.int64(2), np.float32(0.25), 5e-324, 1e300):
        assert R.attention(q, k, v, softmax_scale=scale, **SMALL).shape == q.shape
        assert R.block_max_scores(q, k, softmax_scale=scale, **SMALL).shape == (2, 4, 3, 7)


@pytest.mark.parametrize("causal", ["False", "True", "", 0, 1, None, np.int64(1), np.array([True])])
def test_causal_must_be_a_bool(qkv, causal):
    """``causal="False"`` used to be truthy, i.e. causal."""
    q, k, v = qkv
    with pytest.raises(TypeError, match="causal: expected a bool, got"):
        R.attention(q, k, v, causal=causal)
    with pytest.raises(TypeError, match="causal: expected a bool, got"):
        R.block_max_scores(q, k, causal=causal)
    with pytest.raises(TypeError, match="causal: expected a bool, got"):
        R.Calibrator([1], causal=causal)
    with pytest.raises(TypeError, match="causal: expected a bool, got"):
        R.gate(np.zeros((1, 4, 3, 7)), None, 40, 50, 16, 8, causal=causal)


def test_numpy_bool_causal_accepted(qkv):
    q, k, v = qkv
    for flag in (True, False):
        a = R.attention(q, k, v, causal=np.bool_(flag), **SMALL)
        assert (a == R.attention(q, k, v, causal=flag, **SMALL)).all()
    assert R.Calibrator([1], causal=np.bool_(False)).causal is False


@pytest.mark.parametrize("thr", [np.complex128(0.5), np.complex64(0.5), np.array(0.5 + 0j), 0.5 + 0j,
                                 np.zeros((4, 2), np.complex128), np.array(0.5, dtype=object),
                                 np.zeros((4, 2), dtype=object)])
def test_complex_and_object_thresholds_refused(qkv, thr):
    """A complex threshold must not lose its imaginary part (even a zero one) to a cast."""
    q, k, v = qkv
    with pytest.raises(TypeError, match="thresholds: expected"):
        R.attention(q, k, v, thr, **SMALL)
    with pytest.raises(TypeError, match="thresholds: expected"):
        R.gate(np.zeros((2, 4, 3, 7)), thr, 40, 50, 16, 8, causal=True)


# ---------------------------------------------------------------------------------------------
# Calibrator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k_values,exc,match", [
    ([], ValueError, "k_values: expected at least one k"),
    ((), ValueError, "k_values: expected at least one k"),
    ([1, 2, 1], ValueError, "k_values: expected no duplicates"),
    ([0], ValueError, "k_values: expected ints >= 1, got 0"),
    ([2, -1], ValueError, "k_values: expected ints >= 1, got -1"),
    ([1.5], TypeError, "k_values: expected ints, got float"),
    ([2.0], TypeError, "k_values: expected ints, got float"),
    ([True], TypeError, "k_values: expected ints, got bool"),
    (["2"], TypeError, "k_values: expected ints, got str"),
    (4, TypeError, "k_values: expected a sequence of ints, got int"),
    (None, TypeError, "k_values: expected a sequence of ints"),
])
def test_bad_k_values(k_values, exc, match):
    with pytest.raises(exc, match=match):
        R.Calibrator(k_values)


def test_k_values_accepted_and_order_kept():
    assert R.Calibrator([8, 1, 4]).k_values == (8, 1, 4)
    assert R.Calibrator(np.array([3, 2])).k_values == (3, 2)
    assert R.Calibrator(range(1, 4)).k_values == (1, 2, 3)


@pytest.mark.parametrize("reduce", ["max", "Mean", "", None, "avg"])
def test_bad_reduce(reduce):
    with pytest.raises(ValueError, match="reduce: expected one of"):
        R.Calibrator([1], reduce=reduce)


def test_calibrator_shape_changes(qkv):
    q, k, _ = qkv
    cal = R.Calibrator([1], **SMALL)
    cal.update(q, k)
    before = cal.thresholds()
    with pytest.raises(ValueError, match=r"expected \(Hq, Hkv, D\) = \(4, 2, 8\) as in earlier updates"):
        cal.update(q[:, :, :2], k)  # Hq
    with pytest.raises(ValueError, match=r"expected \(Hq, Hkv, D\) = \(4, 2, 8\)"):
        cal.update(q, k[:, :, :1])  # Hkv
    with pytest.raises(ValueError, match=r"expected \(Hq, Hkv, D\) = \(4, 2, 8\)"):
        cal.update(q[..., :4], k[..., :4])  # D
    # a rejected update leaves the state untouched; batch size and lengths may change
    assert (cal.thresholds() == before).all() and cal.num_samples == 2
    cal.update(q[:1, :17], k[:1, :33])
    assert cal.num_samples == 3


def test_calibrator_bad_update_inputs(qkv):
    q, k, _ = qkv
    cal = R.Calibrator([1], **SMALL)
    with pytest.raises(ValueError, match="q and k: expected rank 4"):
        cal.update(q[0], k)
    with pytest.raises(ValueError, match="expected head_dim 8"):
        cal.update(q, k[..., :4])
    with pytest.raises(TypeError, match="q: expected dtype in"):
        cal.update(q.astype(np.int32), k)
    with pytest.raises(ValueError, match="no samples yet"):
        cal.thresholds()  # failed updates recorded nothing
    cal.update(q, k)
    assert cal.thresholds().shape[:2] == (1, 4)


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">f2"])
def test_non_native_byte_order_floats_accepted(qkv, dtype):
    """A byte-swapped float64/float32/float16 array is still that dtype (spec: float16, float32,
    float64 accepted); it must give the same result as the native array, not a TypeError."""
    q, k, v = (x.astype(np.dtype(dtype).newbyteorder("=")) for x in qkv)
    want = R.attention(q, k, v, 0.0, **SMALL)
    got = R.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), 0.0, **SMALL)
    assert (got == want).all()
