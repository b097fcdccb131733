"""bsfa_cupy.Calibrator on the GPU against bsfa_reference.Calibrator on the same samples."""
from __future__ import annotations

import numpy as np
import pytest

import bsfa_cupy
import bsfa_reference as ref
from tests.support.gpu import HOST_DTYPES, cp, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

#: (Nq, Nk) of successive updates: equal lengths, partial tiles, queries after a prefix
UPDATES = [(1024, 1024), (700, 700), (384, 1000)]


def _samples(dtype, Hq=4, Hkv=2, D=64, B=2, seed=0):
    rng = np.random.default_rng(seed)
    ht = HOST_DTYPES[dtype]
    # a wide score spread, so that midpoints are far apart compared with float32 rounding
    return [(rng.standard_normal((B, Nq, Hq, D)).astype(ht) * 2, rng.standard_normal((B, Nk, Hkv, D)).astype(ht))
            for Nq, Nk in UPDATES]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("reduce", ["mean", "median"])
def test_gpu_calibrator_matches_reference(dtype, causal, reduce):
    ks = [1, 4, 8, 30]
    gpu = bsfa_cupy.Calibrator(ks, causal=causal, reduce=reduce)
    host = ref.Calibrator(ks, causal=causal, reduce=reduce)

    class Fed(ref.Calibrator):  # the reference rule on the kernel's own float32 maxima, on the host
        def _tile_max(self, q, k):
            return cp.asnumpy(bsfa_cupy.block_max_scores(cp.asarray(q), cp.asarray(k), causal=causal))

    fed = Fed(ks, causal=causal, reduce=reduce)
    for q, k in _samples(dtype):
        gpu.update(cp.asarray(q), cp.asarray(k))
        host.update(q, k)
        fed.update(q, k)
    got = gpu.thresholds()
    assert got.dtype == np.float32 and got.shape == host.thresholds().shape
    assert gpu.num_samples == host.num_samples == 2 * len(UPDATES)
    # same maxima -> bit-identical: the selection on the GPU is the reference's, in float64
    np.testing.assert_array_equal(got, fed.thresholds())
    # float64 maxima: equal up to float32 rounding (same -inf pattern)
    want = host.thresholds()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gpu_calibrator_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    ks = [2, 8]
    from_cupy, from_torch = bsfa_cupy.Calibrator(ks), bsfa_cupy.Calibrator(ks)
    for q, k in _samples("float16"):
        from_cupy.update(cp.asarray(q), cp.asarray(k))
        with torch.inference_mode():
            from_torch.update(torch.from_numpy(q).cuda(), torch.from_numpy(k).cuda())
    np.testing.assert_array_equal(from_torch.thresholds(), from_cupy.thresholds())


def test_gpu_calibrator_rejects_host_arrays_and_shape_changes():
    cal = bsfa_cupy.Calibrator([2])
    q, k = _samples("float16")[0]
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        cal.update(q, k)
    cal.update(cp.asarray(q), cp.asarray(k))
    with pytest.raises(ValueError, match=r"expected \(Hq, Hkv, D\)"):
        cal.update(cp.asarray(q[:, :, :2]), cp.asarray(k))
