"""The GPU tests' backend fixture: every kernel test runs on every forward kernel."""
from __future__ import annotations

import pytest

from tests.support.gpu import cp


def _is_hopper() -> bool:
    return cp is not None and str(cp.cuda.Device().compute_capability) == "90"


@pytest.fixture(params=["auto", "sm80", "sm90"])
def backend(request):
    """Every test runs on every forward kernel: "auto" (on Hopper the warp-specialised sm90ws for
    head dims 64 / 128, mma.sync for the others), "sm80" (mma.sync everywhere) and, on Hopper, "sm90"
    (the one-warpgroup wgmma kernel; tests map other head dims to "sm80" with kernel_backend)."""
    if request.param != "sm80" and not _is_hopper():
        pytest.skip(f"off Hopper, {request.param!r} is not run ('auto' is the mma.sync kernel 'sm80' tests)")
    return request.param
