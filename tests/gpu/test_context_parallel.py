"""Context-parallel attention with the kernel: the ring's per-step code on one GPU (ranks simulated in
one process), and the NCCL ring across 2 and 4 GPUs where the machine has them; both against one
kernel call on the whole sequence (keep identical) and the float64 reference replaying that keep."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import bsfa_reference as ref
from tests.support.gpu import (EPS, check_against_reference, random_inputs, requires_gpu, rounding_margin,
                               thresholds_from_maxima)
from tests.support.reference_helpers import assert_close, assert_same_mask

pytestmark = [pytest.mark.gpu, requires_gpu]

HQ, HKV = 8, 2


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


def problem(world, dtype, D, thresholds, seed):
    """Host q, k, v of n = world * 2 * 256 positions and thresholds (None or (Hq, T) midway between tile maxima)."""
    n = world * 2 * 256
    q, k, v = random_inputs(np.random.default_rng(seed), 1, n, n, HQ, HKV, D, dtype, spread=1.5)
    if thresholds == "dense":
        return q, k, v, None
    tm = ref.block_max_scores(q, k)
    return q, k, v, thresholds_from_maxima(tm, n, n, 0.5, margin=rounding_margin(q, k, True, D))


def assert_matches_one_call(got, one, what, dtype):
    """keep identical, out within 2 eps max(1, max|out|), lse within 2 (1e-4 + 2e-6 |lse|): the criteria of
    bench/context_parallel.py, the GPU suite's bounds against float64 once for each of the two computations."""
    (out, lse, keep), (o1, l1, k1) = got, one
    assert_same_mask(keep, k1, f"{what}: keep vs one call")
    tol = 2 * EPS[dtype] * max(1.0, float(np.abs(o1).max()))
    assert_close(out, o1, 0.0, tol, f"{what}: out vs one call")
    assert_close(lse, l1, 4e-6, 2e-4, f"{what}: lse vs one call")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("thresholds", ["dense", "table"])
@pytest.mark.parametrize("dtype,D", [("float16", 128), ("bfloat16", 64)])
def test_simulated_ring_on_the_kernel(world, layout, thresholds, dtype, D):
    torch = _torch()
    import bsfa_cupy
    from bsfa_cupy._ring_step import RankAttention, kernel_call
    from bsfa_cupy.distributed import _thresholds_for, shard, unshard

    q, k, v, thr = problem(world, dtype, D, thresholds, seed=world * 10 + D)
    tdt = getattr(torch, dtype)
    full = [torch.from_numpy(x.astype(np.float32)).to(device="cuda", dtype=tdt) for x in (q, k, v)]
    with torch.inference_mode():
        one = [x.float().cpu().numpy() if x.dtype != torch.bool else x.cpu().numpy()
               for x in bsfa_cupy.attention(*full, thr, return_lse=True, return_keep=True)]
        kernel_thr = _thresholds_for(thr, full[0])  # a DeviceThresholds, as the ring passes it
        shards = [[shard(x, r, world, layout).contiguous() for x in full] for r in range(world)]
        results = []
        for r in range(world):
            st = RankAttention(shards[r][0], kernel_thr, rank=r, world=world, layout=layout, causal=True,
                               softmax_scale=None, want_keep=True, call=kernel_call)
            for step in range(world):
                src = (r - step) % world
                st.attend(shards[src][1], shards[src][2], src)
            out, lse, keep = st.result()
            assert out.dtype == tdt and lse.dtype == torch.float32
            results.append((out.float().cpu().numpy(), lse.cpu().numpy(), keep.cpu().numpy()))
    got = [unshard([x[i] for x in results], layout, dim) for i, dim in ((0, 1), (1, 2), (2, 2))]
    what = f"{world} ranks {layout} {thresholds} {dtype} D={D}"
    if thr is not None:
        assert not one[2].all(), f"{what}: the thresholds must skip some tiles"
    assert_matches_one_call(got, one, what, dtype)
    check_against_reference(got[0], got[1], q, k, v, got[2], True, 1 / math.sqrt(D), dtype, what)


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_ring(world, tmp_path, monkeypatch):
    torch = _torch()
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    from tests.gpu import context_parallel_worker

    cases = {}
    for layout in ("zigzag", "contiguous"):
        for thresholds in ("dense", "table"):
            q, k, v, thr = problem(world, "float16", 128, thresholds, seed=world)
            cases[f"{layout}-{thresholds}"] = (q, k, v, thr, layout)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    mp.spawn(context_parallel_worker.run, args=(world, str(tmp_path / "init"), str(tmp_path), cases), nprocs=world,
             join=True)
    found = pickle.loads((tmp_path / "found.pkl").read_bytes())
    assert sorted(found) == sorted(cases)
    for name, (out, lse, keep, o1, l1, k1) in found.items():
        q, k, v, thr, _ = cases[name]
        what = f"NCCL, {world} GPUs, {name}"
        assert_matches_one_call((out, lse, keep), (o1, l1, k1), what, "float16")
        check_against_reference(out, lse, q, k, v, keep, True, 1 / math.sqrt(128), "float16", what)
