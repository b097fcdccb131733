"""The reference refuses inputs whose float64 (B, Hq, Nq, Nk) arrays would not fit its memory bound
(4 GiB, or BSFA_REFERENCE_MAX_BYTES), before allocating them; its estimate bounds the real peak."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import bsfa_reference as R
from bsfa_reference._memory import DEFAULT_MAX_BYTES, attention_bytes, block_max_bytes
from tests.support.reference_helpers import make_qkv


def _lazy(B, N, H, D):
    """A (B, N, H, D) float16 array that takes no memory (a zero-stride view)."""
    return np.broadcast_to(np.zeros((1, 1, 1, 1), np.float16), (B, N, H, D))


def _traced_peak(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.fixture(autouse=True)
def _default_bound(monkeypatch):
    monkeypatch.delenv("BSFA_REFERENCE_MAX_BYTES", raising=False)


@pytest.mark.parametrize("what,N,gpu", [
    ("bsfa_reference.attention", 10000, "bsfa_cupy.attention"),  # about 6.4 GiB at the peak
    ("bsfa_reference.block_max_scores", 16384, "bsfa_cupy.block_max_scores"),  # about 8 GiB
    ("bsfa_reference.Calibrator.update", 16384, "bsfa_cupy.block_max_scores"),
])
def test_long_sequence_is_refused_before_allocating(what, N, gpu):
    """Hq = 4, D = 64: refused with the size, the bound and the ways out, having allocated nothing
    of that size: the inputs are zero-stride views, and at most an input-sized finiteness mask
    (4 MiB here; the Calibrator checks q and k first) is allocated before the refusal."""
    q, k = _lazy(1, N, 4, 64), _lazy(1, N, 1, 64)
    call = {"bsfa_reference.attention": lambda: R.attention(q, k, k),
            "bsfa_reference.block_max_scores": lambda: R.block_max_scores(q, k),
            "bsfa_reference.Calibrator.update": lambda: R.Calibrator([1]).update(q, k)}[what]
    errors = []

    def run():
        with pytest.raises(ValueError) as info:
            call()
        errors.append(str(info.value))

    assert _traced_peak(run) < 8 * 2**20, f"{what}: allocated before refusing"
    msg = errors[0]
    assert msg.startswith(f"{what}: expected inputs that fit in 4.00 GiB of host memory (BSFA_REFERENCE_MAX_BYTES)")
    estimate = attention_bytes if what.endswith("attention") else block_max_bytes
    need = estimate(1, N, N, 4, 1, 64)
    assert need > 6 * 2**30
    assert f"got B=1, Nq={N}, Nk={N}, Hq=4, Hkv=1, D=64 needing about {need / 2**30:.2f} GiB at the peak" in msg, msg
    assert gpu in msg and "set BSFA_REFERENCE_MAX_BYTES to a larger byte count" in msg, msg


def test_calibrator_refusal_leaves_its_state():
    q, k, _ = make_qkv(1, 64, 64, 2, 1, 8, seed=0)
    cal = R.Calibrator([1], block_m=16, block_n=8)
    cal.update(q, k)
    before = cal.thresholds()
    with pytest.raises(ValueError, match="bsfa_reference.Calibrator.update: expected inputs that fit"):
        cal.update(_lazy(1, 20000, 2, 8), _lazy(1, 20000, 1, 8))
    assert cal.num_samples == 1
    np.testing.assert_array_equal(cal.thresholds(), before)


def test_bound_from_the_environment(monkeypatch):
    q, k, v = make_qkv(1, 300, 300, 2, 1, 16, seed=1)
    need = attention_bytes(1, 300, 300, 2, 1, 16)
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", str(need - 1))
    with pytest.raises(ValueError, match=r"attention: expected inputs that fit in .* got B=1, Nq=300"):
        R.attention(q, k, v)
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", str(need))
    R.attention(q, k, v)
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", str(block_max_bytes(1, 300, 300, 2, 1, 16) - 1))
    with pytest.raises(ValueError, match="block_max_scores: expected inputs that fit"):
        R.block_max_scores(q, k)
    with pytest.raises(ValueError, match="Calibrator.update: expected inputs that fit"):
        R.Calibrator([1]).update(q, k)
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", str(100 * 2**30))  # raising the bound lets N = 10000 through
    from bsfa_reference._memory import check_memory, max_bytes

    assert max_bytes() == 100 * 2**30
    check_memory(attention_bytes(1, 10000, 10000, 4, 1, 64), "x", "", "")


@pytest.mark.parametrize("text", ["4GiB", "1e9", "-5", "0", "lots"])
def test_bad_bound_in_the_environment(monkeypatch, text):
    q, k, v = make_qkv(1, 8, 8, 1, 1, 4, seed=2)
    monkeypatch.setenv("BSFA_REFERENCE_MAX_BYTES", text)
    with pytest.raises(ValueError, match=r"BSFA_REFERENCE_MAX_BYTES: expected a (whole|positive) number of bytes"):
        R.attention(q, k, v)


def test_default_bound_is_4_gib_and_admits_the_cpu_harness_sizes():
    assert DEFAULT_MAX_BYTES == 4 * 2**30
    # bsfa accuracy / demo on the CPU: N up to 4096 with 4 query heads, D = 64
    assert attention_bytes(1, 4096, 4096, 4, 1, 64) < DEFAULT_MAX_BYTES


@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("fn", ["attention", "block_max_scores"])
def test_estimate_bounds_the_measured_peak(fn, nonfinite):
    """The estimate is an upper bound of what tracemalloc sees (NumPy reports its allocations) and
    not a wild one: within 2.5x at 4M scores."""
    B, N, Hq, Hkv, D = 1, 1000, 4, 2, 64
    q, k, v = make_qkv(B, N, N, Hq, Hkv, D, dtype=np.float16, seed=3)
    if nonfinite:
        q[0, 5, 1, 3] = np.nan
        q[0, :, 2, 0] = np.inf
        k[0, 9, 0, :] = np.nan
        v[0, 11, 1, 2] = np.inf
    if fn == "attention":
        peak = _traced_peak(lambda: R.attention(q, k, v, 0.5, return_lse=True, return_keep=True))
        est = attention_bytes(B, N, N, Hq, Hkv, D)
    else:
        peak = _traced_peak(lambda: R.block_max_scores(q, k))
        est = block_max_bytes(B, N, N, Hq, Hkv, D)
    assert peak <= est <= 2.5 * peak, f"{fn}: measured peak {peak / 2**20:.1f} MiB, estimate {est / 2**20:.1f} MiB"
