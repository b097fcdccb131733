"""The tensor maps of the warp-specialised Hopper kernel, without a GPU: what `_tma.tensor_map` asks the
driver to encode (a stand-in records the call) and what it refuses before asking."""
from __future__ import annotations

import types

import numpy as np
import pytest

from bsfa_cupy import _tma


class _FakeDriver:
    """The parts of cuda.bindings.driver that tensor_map touches; records the encode call."""

    def __init__(self):
        self.calls = []
        ns = types.SimpleNamespace
        self.CUtensorMapDataType = ns(CU_TENSOR_MAP_DATA_TYPE_FLOAT16="f16", CU_TENSOR_MAP_DATA_TYPE_BFLOAT16="bf16")
        self.CUtensorMapInterleave = ns(CU_TENSOR_MAP_INTERLEAVE_NONE="none")
        self.CUtensorMapSwizzle = ns(CU_TENSOR_MAP_SWIZZLE_128B="sw128")
        self.CUtensorMapL2promotion = ns(CU_TENSOR_MAP_L2_PROMOTION_L2_256B="l2_256")
        self.CUtensorMapFloatOOBfill = ns(CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE="zeros")
        self.CUresult = ns(CUDA_SUCCESS=0)
        self.cuuint64_t = int
        self.cuuint32_t = int
        self.result = 0

    def cuTensorMapEncodeTiled(self, *args):
        self.calls.append(args)
        return self.result, types.SimpleNamespace(opaque=list(range(100, 116)))


class _View:
    """The shape/strides/dtype/pointer of a CuPy view, from a NumPy array of the same layout."""

    def __init__(self, arr, ptr=0x7F0000000000):
        self.shape, self.strides, self.dtype = arr.shape, arr.strides, arr.dtype
        self.data = types.SimpleNamespace(ptr=ptr)


@pytest.fixture
def driver(monkeypatch):
    fake = _FakeDriver()
    monkeypatch.setattr(_tma, "_driver", lambda: fake)
    _tma._encode.cache_clear()
    yield fake
    _tma._encode.cache_clear()


def test_maps_are_the_4d_tensor_d_n_h_b_with_its_own_byte_strides(driver):
    # A (B, N, H, D) view of a (B, H, N, D) buffer: strides are not the contiguous ones.
    base = np.zeros((2, 3, 300, 128), np.float16)
    view = _View(base.transpose(0, 2, 1, 3))
    rec = _tma.tensor_map(view, 128)
    (dtype, rank, ptr, dims, strides, box, elem, inter, swz, l2, oob), = driver.calls
    assert (dtype, rank, ptr) == ("f16", 4, 0x7F0000000000)
    assert dims == [128, 300, 3, 2], dims
    assert strides == [128 * 2, 300 * 128 * 2, 3 * 300 * 128 * 2], strides  # N, H, B in bytes
    assert box == [64, 128, 1, 1] and elem == [1, 1, 1, 1]
    assert (inter, swz, l2, oob) == ("none", "sw128", "l2_256", "zeros")
    assert rec.dtype == _tma.TMA_DESC and rec.dtype.itemsize == 128
    assert list(rec["opaque"]) == list(range(100, 116))
    # The same array again (a per-layer loop): the map comes from the cache, not from the driver.
    again = _tma.tensor_map(view, 128)
    assert len(driver.calls) == 1 and list(again["opaque"]) == list(rec["opaque"])
    _tma.tensor_map(view, 64)  # another box is another map
    assert len(driver.calls) == 2


def test_size_one_dims_get_a_legal_stride_whatever_the_framework_reports(driver):
    view = _View(np.zeros((1, 64, 1, 64), np.float16))
    view.strides = (0, 128, 0, 2)  # what a broadcast or a squeezed torch tensor may report
    _tma.tensor_map(view, 128)
    strides = driver.calls[0][4]
    assert all(s > 0 and s % 16 == 0 for s in strides), strides


def test_bfloat16_maps_say_so(driver):
    import ml_dtypes

    _tma.tensor_map(_View(np.zeros((1, 8, 1, 64), ml_dtypes.bfloat16)), 128)
    assert driver.calls[0][0] == "bf16"


def test_misaligned_strides_and_driver_errors_are_clear(driver):
    view = _View(np.zeros((1, 8, 2, 64), np.float16))
    view.strides = (8704, 1088, 136, 2)  # 136-byte head stride: not a multiple of 16
    with pytest.raises(ValueError, match=r"multiples of 16 bytes .* got 136 bytes"):
        _tma.tensor_map(view, 128)
    assert not driver.calls, "refused before asking the driver"
    driver.result = 1
    with pytest.raises(ValueError, match="cuTensorMapEncodeTiled rejected"):
        _tma.tensor_map(_View(np.zeros((1, 8, 2, 64), np.float16)), 128)


def test_missing_bindings_name_the_extra(monkeypatch, driver):
    _tma.tensor_map(_View(np.zeros((1, 8, 1, 64), np.float16)), 128)  # cached: the hint must still come

    def missing():
        raise ImportError(_tma.MISSING_BINDINGS)

    monkeypatch.setattr(_tma, "_driver", missing)
    assert _tma.available() is False
    with pytest.raises(ImportError, match=r"bsfa-cupy\[cuda12\]"):
        _tma.tensor_map(_View(np.zeros((1, 8, 1, 64), np.float16)), 128)
