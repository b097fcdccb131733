"""Optional CuPy import: the package imports without it; GPU calls say which extra to install."""
from __future__ import annotations

import functools

MISSING_CUPY = (
    "bsfa_cupy needs CuPy >= 14 for GPU arrays: pip install 'bsfa-cupy[cuda12]' (CUDA 12.x) or "
    "'bsfa-cupy[cuda13]' (CUDA 13.x). For host NumPy arrays use bsfa_reference.attention."
)


@functools.cache
def cupy():
    """The cupy module, or ImportError naming the extra to install."""
    try:
        import cupy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(MISSING_CUPY) from exc
    major = int(cp.__version__.split(".")[0])
    if major < 14:
        raise ImportError(f"bsfa_cupy needs CuPy >= 14 (native bfloat16), found {cp.__version__}. " + MISSING_CUPY)
    return cp


def has_gpu() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
