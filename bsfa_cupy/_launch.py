"""The launch ABI on the host side: ``bsfa::Params`` packed once per call, and the launch grids.

``PARAMS`` mirrors ``kernels_cu/bsfa_params.cuh`` field by field (tests/kernels/test_params.py
compiles that header and checks every offset); the grids mirror the decode in
``kernels_cu/bsfa_scheduler.cuh``, whose kernels export which grid they expect (``BSFA_GRID``).
"""
from __future__ import annotations

import math

import numpy as np

_PTR, _I64, _I32, _F32 = np.uint64, np.int64, np.int32, np.float32
_STRIDES = tuple(f"{t}_{d}" for t in "qkvo" for d in ("sb", "sn", "sh"))

#: ``bsfa::Params``: same names, order and C layout (``align=True``).
PARAMS = np.dtype(
    [(name, _PTR) for name in ("q", "k", "v", "out", "lse", "keep", "thresholds", "tile_max",
                                        "cu_seqlens_q", "cu_seqlens_k", "o_part", "lse_part", "split_done")]
    + [(name, _I64) for name in _STRIDES]
    + [(name, _I32) for name in ("Nq", "Nk", "Hq", "Hkv", "thr_mode", "thr_T", "k_start", "qk_shift",
                                        "total_q", "B", "num_splits", "pack_heads")]
    + [(name, _F32) for name in ("thr_scalar", "softmax_scale")],
    align=True,
)

#: CUDA's limit on gridDim.y and gridDim.z.
MAX_GRID_YZ = 65535
#: BSFA_GRID values exported by the kernels.
GRID_PER_HEAD = 0  # (nQ, Hq, B)
GRID_CHUNKED = 1  # (w, nQ, B*Hq/w): heads handed out w at a time
GRID_PERSISTENT = 2  # (min(SMs, tiles), 1, 1): each CTA walks the tile list
#: The persistent kernels count tiles (nQ * B * Hq) in an int.
MAX_TILES = 2**31 - 1


def pack(**fields) -> np.void:
    """One ``bsfa::Params`` value; fields not given are 0 (null pointers, unused sizes).

    Pointers are given as CuPy arrays (their data pointer is taken) or None.
    """
    unknown = set(fields) - set(PARAMS.names)
    if unknown:
        raise TypeError(f"bsfa::Params has no field(s) {sorted(unknown)}")
    rec = np.zeros((), PARAMS)
    for name, value in fields.items():
        if value is None:
            continue
        rec[name] = value.data.ptr if hasattr(value, "data") and hasattr(value.data, "ptr") else value
    return rec[()]


def grid(kind: int, B: int, Hq: int, nQ: int, sms: int = 1) -> tuple[int, int, int]:
    """The grid a kernel of BSFA_GRID ``kind`` decodes (kernels_cu/bsfa_scheduler.cuh)."""
    if kind == GRID_PER_HEAD:
        return (nQ, Hq, B)
    if kind == GRID_PERSISTENT:
        tiles = nQ * B * Hq
        if tiles > MAX_TILES:
            raise ValueError(f"expected at most {MAX_TILES} work tiles (nQ * B * Hq), got {nQ} * {B} * {Hq} = {tiles}")
        return (max(1, min(sms, tiles)), 1, 1)
    if kind != GRID_CHUNKED:
        raise ValueError(f"BSFA_GRID: expected {GRID_PER_HEAD}, {GRID_CHUNKED} or {GRID_PERSISTENT}, got {kind}")
    bh = B * Hq
    w = next(w for w in (4, 2, 1) if bh % w == 0)
    if bh // w > MAX_GRID_YZ:  # huge batches: wider chunks, so that gridDim.z fits
        w = min(d for d in _divisors(bh) if bh // d <= MAX_GRID_YZ)
    return (w, nQ, bh // w)


def check_grid(B: int, Hq: int, nQ: int, block_m: int) -> None:
    """Both fixed grids fit CUDA's limits: (nQ, Hq, B) and (w, nQ, B*Hq/w)."""
    if nQ > MAX_GRID_YZ or B > MAX_GRID_YZ or Hq > MAX_GRID_YZ:
        raise ValueError(
            f"expected at most {MAX_GRID_YZ} query tiles (Nq <= {MAX_GRID_YZ * block_m}), batch and heads "
            f"each (CUDA grid limits), got {nQ} query tiles, B={B}, Hq={Hq}"
        )



def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in small]
