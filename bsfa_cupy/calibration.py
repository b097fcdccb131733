"""Threshold calibration on the GPU: the reference's rule, fed by the kernel's tile maxima."""
from __future__ import annotations

import numpy as np

import bsfa_reference

from ._backend import cupy
from bsfa_reference.tiles import BLOCK_M, BLOCK_N

#: exponent bits of the 16-bit float formats: all set means inf or NaN
_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


class Calibrator(bsfa_reference.Calibrator):
    """Streaming BSFA threshold calibration for one model layer, on the GPU.

    Same constructor, methods and results as :class:`bsfa_reference.Calibrator` (see there for the
    rule), but :meth:`update` takes CuPy arrays, torch CUDA tensors or JAX GPU arrays (float16 or
    bfloat16, head dim 64 or 128, as :func:`bsfa_cupy.attention`). The tile maxima come from
    :func:`bsfa_cupy.block_max_scores` (no N x N matrix) and the k-th/(k+1)-th selection runs on
    the GPU with CuPy (``bsfa_reference.sample_thresholds`` with ``xp=cupy``); only the per-sample
    midpoints, (len(k_values), B, Hq, nQ) float64, go to the host, where :meth:`thresholds`
    reduces them. Results equal the reference's on the same inputs up to the float32 rounding of
    the tile maxima (the order of two maxima within that rounding can swap).

    The tiles are the kernel's, 128 queries x 64 keys; other ``block_m``/``block_n`` are a ValueError.
    q or k with a NaN or ±inf is a ValueError (one reduction on the GPU per array): the kernel's
    maxima ignore NaN scores, which would bias the thresholds without a sign.
    """

    def __init__(self, k_values, *, causal=True, softmax_scale=None, block_m=BLOCK_M, block_n=BLOCK_N,
                 reduce="mean"):
        super().__init__(k_values, causal=causal, softmax_scale=softmax_scale, block_m=block_m,
                         block_n=block_n, reduce=reduce)
        if (self.block_m, self.block_n) != (BLOCK_M, BLOCK_N):
            raise ValueError(
                f"block_m x block_n: expected the kernel's {BLOCK_M}x{BLOCK_N} tiles, got "
                f"{self.block_m}x{self.block_n}; use bsfa_reference.Calibrator for other tile sizes"
            )

    @property
    def _xp(self):
        return cupy()

    def _count_nonfinite(self, x, name: str) -> int:
        if isinstance(x, np.ndarray):  # counted on the host; the kernel call refuses host arrays later
            return super()._count_nonfinite(x, name)
        from ._arrays import to_cupy

        return count_nonfinite(to_cupy(x, name), cupy())

    def _tile_max(self, q, k):
        from .ops import block_max_scores

        tile_max = block_max_scores(q, k, causal=self.causal, softmax_scale=self.softmax_scale)
        # A CuPy view of the caller's array type (torch/JAX through DLPack, stream-ordered).
        return cupy().from_dlpack(tile_max)


def count_nonfinite(x, xp) -> int:
    """NaN and ±inf entries of the array ``x`` of module ``xp`` (cupy or numpy); 0 for non-floats.

    float16 and bfloat16 are tested on their bits (exponent all ones), which needs no float
    arithmetic in those types; CuPy's support for bfloat16 ufuncs varies between versions.
    """
    mask = _EXPONENT_BITS.get(str(x.dtype))
    if mask is not None:
        bits = x.view(xp.uint16)
        return int(xp.count_nonzero((bits & mask) == mask))
    if x.dtype.kind != "f":
        return 0
    return int(x.size - xp.count_nonzero(xp.isfinite(x)))
