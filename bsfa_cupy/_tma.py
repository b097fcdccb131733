"""Tensor maps for the TMA loads of the warp-specialised Hopper kernel (``sm90ws``).

A tensor map is 128 opaque bytes that only the driver can encode (``cuTensorMapEncodeTiled``);
CuPy exposes no binding for it, so it comes from NVIDIA's ``cuda-bindings`` package (the GPU
extras install it). Each (B, N, H, D) array is described as the 4-D tensor (D, N, H, B) with its
own byte strides, so any strides with a contiguous last dimension work without a copy; a box is
64 columns (128 bytes, the 128-byte swizzle the wgmma descriptors read) by ``box_rows`` rows, and
rows past N arrive as zeros.
"""
from __future__ import annotations

import functools

import numpy as np

MISSING_BINDINGS = (
    "backend 'sm90ws' loads its tiles with the TMA, whose tensor maps need NVIDIA's cuda-bindings: "
    "pip install 'bsfa-cupy[cuda12]' or 'bsfa-cupy[cuda13]' (they include it), or cuda-bindings for your CUDA"
)

#: The kernel's ``bsfa::TmaDesc``: 128 bytes, passed by value.
TMA_DESC = np.dtype([("opaque", np.uint64, (16,))])
BOX_COLS = 64  # 128 bytes of 16-bit elements: one swizzle row
_MAX_STRIDE = 1 << 40


@functools.cache
def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        try:  # cuda-python 12.x before the package split
            from cuda import cuda as driver
        except ImportError as exc:
            raise ImportError(MISSING_BINDINGS) from exc
    return driver


def available() -> bool:
    """True when the tensor-map encoder imports (the 'auto' backend needs it for sm90ws)."""
    try:
        _driver()
        return True
    except ImportError:
        return False


def tensor_map(view, box_rows: int) -> np.void:
    """The tensor map of a (B, N, H, D) CuPy view for boxes of ``box_rows`` rows x 64 columns."""
    _driver()  # the install hint before anything else, cached map or not
    return tensor_map_at(int(view.data.ptr), geometry(view, box_rows))


def geometry(view, box_rows: int) -> tuple:
    """Everything of a map but the address, checked: a plan (bsfa_cupy.plan) computes it once per layout
    and encodes each call's pointer with :func:`tensor_map_at`."""
    B, N, H, D = (int(x) for x in view.shape)
    item = view.dtype.itemsize
    dims = [D, N, H, B]
    # Byte strides of N, H, B. A size-1 dimension is only ever read at index 0, so its stride is
    # free; the driver still wants a multiple of 16 below 2^40, whatever the framework reports.
    strides = []
    inner = D * item
    for size, stride in ((N, view.strides[1]), (H, view.strides[2]), (B, view.strides[0])):
        strides.append(int(stride) if size > 1 else max(16, -(-inner // 16) * 16))
        inner = max(inner, abs(int(stride)) * size)
    for name, s in zip(("seq", "head", "batch"), strides):
        if s <= 0 or s % 16 or s >= _MAX_STRIDE:
            raise ValueError(
                f"the TMA needs positive {name} strides that are multiples of 16 bytes below 2^40, got {s} bytes "
                f"(strides {view.strides}); pass a contiguous array or use backend='sm90'"
            )
    return tuple(dims), tuple(strides), str(view.dtype), box_rows, tuple(view.strides)


def tensor_map_at(ptr: int, geom: tuple) -> np.void:
    """The map of the array at ``ptr`` laid out as ``geom`` (from :func:`geometry`)."""
    return _encode(ptr, *geom)


@functools.lru_cache(maxsize=256)
def _encode(ptr: int, dims: tuple, strides: tuple, dtype_name: str, box_rows: int, view_strides: tuple) -> np.void:
    """The encoded map, once per (address, geometry): a map holds nothing else, and a per-layer loop calls
    with the same arrays again and again, so the driver call leaves the hot path."""
    d = _driver()
    dtype = {
        "float16": d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        "bfloat16": d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    }[dtype_name]
    err, tmap = d.cuTensorMapEncodeTiled(
        dtype,
        4,
        ptr,
        [d.cuuint64_t(x) for x in dims],
        [d.cuuint64_t(x) for x in strides],
        [d.cuuint32_t(x) for x in (BOX_COLS, box_rows, 1, 1)],
        [d.cuuint32_t(1)] * 4,
        d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != d.CUresult.CUDA_SUCCESS:
        raise ValueError(
            f"cuTensorMapEncodeTiled rejected a (B, N, H, D) = {tuple(reversed(dims))} {dtype_name} array with byte "
            f"strides {view_strides} at {ptr:#x}: {err!r}"
        )
    rec = np.zeros((), TMA_DESC)
    rec["opaque"] = np.array([int(x) for x in tmap.opaque], dtype=np.uint64)
    return rec[()]
