"""The body of each process of the multi-process tests: a gloo group on CPU tensors, every case in one run.

Each rank writes what it computed (and the errors it raised) to ``out_dir/rank{r}.npz``; the test in
the parent process compares them with the whole-sequence reference call.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch
import torch.distributed as dist

from bsfa_cupy.distributed import context_parallel_attention, gather, shard
from tests.distributed.support import problem, thresholds_that_skip

LAYOUTS = ("zigzag", "contiguous")


def cases(world):
    """(name, layout, thresholds kind, causal, batch) of every run; n = world * 2 * 128."""
    out = [(f"{layout}-{thr}", layout, thr, True, 1) for layout in LAYOUTS for thr in ("dense", "table")]
    out.append(("zigzag-table-b2-noncausal", "zigzag", "table", False, 2))
    return out


def inputs(world, thr, causal, batch):
    n = world * 2 * 128
    q, k, v = problem(n, batch=batch, seed=world)
    return q, k, v, (None if thr == "dense" else thresholds_that_skip(q, k, causal=causal))


def run(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results, errors = {}, {}
        for name, layout, thr, causal, batch in cases(world):
            q, k, v, thresholds = inputs(world, thr, causal, batch)
            local = [torch.from_numpy(shard(x, rank, world, layout)) for x in (q, k, v)]
            # thresholds as a CPU tensor on odd ranks, a NumPy array on even ones: both are accepted
            t = torch.from_numpy(thresholds) if thresholds is not None and rank % 2 else thresholds
            out, lse, keep = context_parallel_attention(*local, t, causal=causal, layout=layout, return_lse=True,
                                                        return_keep=True)
            results[name] = dict(out=out.numpy(), lse=lse.numpy(), keep=keep.numpy(),
                                 out_all=gather(out, layout=layout).numpy(),
                                 lse_all=gather(lse, layout=layout, dim=2).numpy(),
                                 keep_all=gather(keep, layout=layout, dim=2).numpy())
            if name == "zigzag-table":  # the bare out of a call that asks for nothing else
                only_out = context_parallel_attention(*local, t, causal=causal, layout=layout)
                results[name]["only_out_equal"] = bool(torch.equal(only_out, out))
        q, k, v = problem(world * 2 * 128 - 2 * world * 64, seed=0)  # chunks of 64 queries
        errors["misaligned"] = _error(lambda: context_parallel_attention(
            *[torch.from_numpy(shard(x, rank, world)) for x in (q, k, v)]))
        n = 256 * (2 if rank == 1 else 1)  # rank 1 holds a longer shard than the others
        q, k, v = (torch.from_numpy(x) for x in problem(n, seed=0))
        errors["unequal"] = _error(lambda: context_parallel_attention(q, k, v))
        qk = torch.from_numpy(problem(256, seed=0)[0])
        bad = qk[:, :128] if rank == 0 else qk  # only rank 0's k is too short
        errors["one_rank_bad"] = _error(lambda: context_parallel_attention(qk, bad, bad))
        q, k, v = (torch.from_numpy(x) for x in problem(256 * world, seed=0))
        errors["thresholds"] = _error(lambda: context_parallel_attention(q, k, v, np.zeros((3, 4), np.float32)))
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump((results, errors), f)
    finally:
        dist.destroy_process_group()


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the parent checks type and message
        return type(exc).__name__, str(exc)
    return None
