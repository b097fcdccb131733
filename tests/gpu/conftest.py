"""The GPU tests' backend fixture: every kernel test runs on both forward kernels."""
from __future__ import annotations

import pytest

from tests.support.gpu import cp


def _is_hopper() -> bool:
    return cp is not None and str(cp.cuda.Device().compute_capability) == "90"


@pytest.fixture(params=["auto", "sm80"])
def backend(request):
    """Every test runs on both forward kernels: "auto" (on Hopper the sm_90a wgmma kernel for head
    dims 64 / 128, mma.sync for the others) and "sm80" (mma.sync everywhere)."""
    if request.param == "auto" and not _is_hopper():
        pytest.skip("off Hopper, 'auto' is the mma.sync kernel that 'sm80' already tests")
    return request.param
