"""One process of the NCCL ring test: shards of host inputs on its GPU, the ring, and on rank 0 the
comparison data (the gathered result and one kernel call on the whole sequence) written for the parent."""
from __future__ import annotations

import os
import pickle

import torch
import torch.distributed as dist

import bsfa_cupy
from bsfa_cupy.distributed import context_parallel_attention, gather, shard


def run(rank, world, init_file, out_dir, cases):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the hosts this runs on
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        found = {}
        for name, (q, k, v, thresholds, layout) in cases.items():
            full = [torch.from_numpy(x).to(device="cuda", dtype=torch.float16) for x in (q, k, v)]
            local = [shard(x, rank, world, layout).contiguous() for x in full]
            with torch.inference_mode():
                out, lse, keep = context_parallel_attention(*local, thresholds, layout=layout, return_lse=True,
                                                            return_keep=True)
                got = [gather(out, layout=layout), gather(lse, layout=layout, dim=2),
                       gather(keep, layout=layout, dim=2)]
                if rank == 0:
                    one = bsfa_cupy.attention(*full, thresholds, return_lse=True, return_keep=True)
                    found[name] = [x.float().cpu().numpy() if x.dtype != torch.bool else x.cpu().numpy()
                                   for x in got + list(one)]
        if rank == 0:
            with open(os.path.join(out_dir, "found.pkl"), "wb") as f:
                pickle.dump(found, f)
    finally:
        dist.destroy_process_group()
