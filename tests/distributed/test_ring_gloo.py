"""The whole ring on 2 and 4 processes (gloo, CPU tensors, the reference as the local attention): each
rank's out, lse and keep, and the gathered sequence, against one reference call on the whole sequence."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.multiprocessing as mp  # noqa: E402

from bsfa_cupy.distributed import context_parallel_attention, shard  # noqa: E402
from tests.distributed import gloo_worker  # noqa: E402
from tests.distributed.support import ATOL32, RTOL32, whole_call  # noqa: E402
from tests.support.reference_helpers import assert_close, assert_same_mask  # noqa: E402

WORLDS = (2, 4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world -> per-rank (results, errors); the processes of each world are started once for all tests."""
    done = {}

    def get(world, monkeypatch):
        if world not in done:
            folder = tmp_path_factory.mktemp(f"ring{world}")
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                monkeypatch.setenv(var, "1")  # the children import NumPy afresh: one BLAS thread each
            mp.spawn(gloo_worker.run, args=(world, str(folder / "init"), str(folder)), nprocs=world, join=True)
            done[world] = [pickle.loads((folder / f"rank{r}.pkl").read_bytes()) for r in range(world)]
        return done[world]

    return get


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [c[0] for c in gloo_worker.cases(2)])
def test_ring_equals_the_whole_call(runs, monkeypatch, world, case):
    ranks = runs(world, monkeypatch)
    name, layout, thr, causal, batch = next(c for c in gloo_worker.cases(world) if c[0] == case)
    q, k, v, thresholds = gloo_worker.inputs(world, thr, causal, batch)
    want_out, want_lse, want_keep = whole_call(q, k, v, thresholds, causal)
    if thresholds is not None:
        assert not want_keep.all() and want_keep.any(), "the thresholds must skip some tiles and keep some"
    for r, (results, _) in enumerate(ranks):
        got = results[name]
        where = f"{case}, rank {r} of {world}"
        assert got["out"].dtype == np.float32 and got["lse"].dtype == np.float32
        assert_same_mask(got["keep"], shard(want_keep, r, world, layout, dim=2), f"keep, {where}")
        assert_close(got["lse"], shard(want_lse, r, world, layout, dim=2), RTOL32, ATOL32, f"lse, {where}")
        assert_close(got["out"], shard(want_out, r, world, layout), RTOL32, ATOL32, f"out, {where}")
        assert got.get("only_out_equal", True), f"{where}: out alone differs from out with lse and keep"
        assert case != "zigzag-table" or "only_out_equal" in got, "the bare-out call was not made"
        assert_same_mask(got["keep_all"], want_keep, f"gathered keep, {where}")
        assert_close(got["lse_all"], want_lse, RTOL32, ATOL32, f"gathered lse, {where}")
        assert_close(got["out_all"], want_out, RTOL32, ATOL32, f"gathered out, {where}")


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_refuses_what_one_rank_refuses(runs, monkeypatch, world):
    ranks = runs(world, monkeypatch)
    for r, (_, errors) in enumerate(ranks):
        kind, message = errors["misaligned"]
        assert kind == "ValueError" and "expected a shard length that is a positive multiple of 256" in message, \
            (r, message)
        assert f"pad the sequence to a multiple of {256 * world}" in message, message
        kind, message = errors["unequal"]
        assert kind == "ValueError" and "every rank must hold an equal shard of one problem" in message, (r, message)
        assert errors["thresholds"] == ("ValueError", "thresholds: expected shape (4, T) with T >= 1 (or a scalar), "
                                                      "got (3, 4)"), errors["thresholds"]
        kind, message = errors["one_rank_bad"]
        if r == 0:
            want = "k_local: expected (B, n, Hkv, D) = (1, 256, Hkv, 16)"
            assert kind == "ValueError" and message.startswith(want), message
        else:
            assert (kind, message) == ("ValueError", "context_parallel_attention: rank(s) [0] of the group refused "
                                                     "their inputs (their errors say why)")


def test_the_ring_needs_an_initialised_process_group():
    x = torch.zeros(1, 256, 1, 16)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised; call "
                                           "torch.distributed.init_process_group first"):
        context_parallel_attention(x, x, x)
