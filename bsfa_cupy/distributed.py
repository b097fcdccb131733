"""Exact context-parallel BSFA over torch.distributed: one long sequence sharded across GPUs.

Each rank holds its shard of q, k and v (:func:`shard`, zigzag by default); the key/value shards
travel around a ring of point-to-point transfers while each rank attends its queries to the shard
it holds, and the partial results are merged by LSE in float32. Every call runs at the absolute
positions of its chunks (``q_start`` / ``k_start``), so each rank keeps exactly the tiles that one
call over the whole sequence keeps, and out and lse are that call's up to rounding.

On CUDA tensors (NCCL) the local attention is :func:`bsfa_cupy.attention`; on CPU tensors (gloo)
it is the float64 reference :func:`bsfa_reference.attention`, which makes the whole algorithm
testable without a GPU.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist

from bsfa_reference._validate import check_thresholds
from bsfa_reference.tiles import BLOCK_M

from ._ring_step import RankAttention, kernel_call, reference_call
from ._sequence_layout import LAYOUTS, check_layout, chunks_per_rank, shard, unshard

__all__ = ["LAYOUTS", "context_parallel_attention", "gather", "shard", "unshard"]


def context_parallel_attention(q_local, k_local, v_local, thresholds=None, *, group=None, causal=True,
                               layout="zigzag", softmax_scale=None, return_lse=False, return_keep=False):
    """Attention of a sequence sharded over the ranks of ``group``, equal to one call on the whole sequence.

    Every rank of ``group`` calls this with its shard (``shard(x, rank, world, layout)`` along
    the sequence axis) of q (B, n, Hq, D) and of k, v (B, n, Hkv, D): the same n on every rank,
    with the layout's chunks (n / 2 for zigzag, n for contiguous) multiples of 128 positions, so
    that every chunk starts on a tile boundary of the whole sequence. The ranks must pass the
    same ``thresholds`` (None, a scalar, an (Hq, T) array indexed by absolute tile position as for
    the whole sequence, or a ``DeviceThresholds``), ``causal``, ``layout`` and ``softmax_scale``.

    K/V shards move around the ring (rank r sends to r + 1) in world - 1 steps; on CUDA the
    transfer of the next shard runs on a separate stream while the current one is attended to.
    Pairs of (query chunk, key chunk) with no valid entry are not computed.

    Returns the rank's out (B, n, Hq, D) in q's dtype, then lse (B, Hq, n) float32 (float64 for
    float64 inputs) of the whole row if ``return_lse``, then keep (B, Hq, n / 128, world * n / 64)
    bool (the rank's query tiles against every key tile of the sequence; the slice of the whole
    call's keep, ``shard(keep, rank, world, layout, dim=2)``) if ``return_keep``. Put the
    sequence back together with :func:`gather` or :func:`unshard`.

    Before the ring starts the ranks exchange their shapes (one small all_gather, which waits for
    it on the host), so that a rank with bad inputs makes every rank raise instead of hanging.
    """
    if not dist.is_initialized():
        raise RuntimeError("context_parallel_attention: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first")
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of it")
    layout = check_layout(layout)
    for name, x in (("q_local", q_local), ("k_local", k_local), ("v_local", v_local)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("return_keep", return_keep)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__} {flag!r}")
    _agree_on_shapes(q_local, k_local, v_local, layout, world, group)

    cuda = q_local.is_cuda
    thresholds = _check_thresholds(_thresholds_for(thresholds, q_local), q_local)
    with torch.no_grad():  # forward only; the kernel refuses tensors that record gradients
        state = RankAttention(q_local, thresholds, rank=rank, world=world, layout=layout, causal=bool(causal),
                              softmax_scale=softmax_scale, want_keep=bool(return_keep),
                              call=kernel_call if cuda else reference_call)
        _ring(state, k_local, v_local, group, rank, world, cuda)
        out, lse, keep = state.result()
    result = (out,) + ((lse,) if return_lse else ()) + ((keep,) if return_keep else ())
    return result[0] if len(result) == 1 else result


def gather(x_local, *, group=None, layout="zigzag", dim=1):
    """The whole sequence on every rank: all_gather of each rank's shard, then :func:`unshard`.

    Takes any of :func:`context_parallel_attention`'s results: out (dim 1), lse (dim 2), keep
    (dim 2, its query tiles).
    """
    group = dist.group.WORLD if group is None else group
    check_layout(layout)
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local: expected a torch.Tensor, got {type(x_local).__name__}")
    x = x_local.contiguous()
    # bool all_gather is not implemented by every backend; bytes are
    wire = x.view(torch.uint8) if x.dtype == torch.bool else x
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, wire, group=group)
    if x.dtype == torch.bool:
        parts = [p.view(torch.bool) for p in parts]
    return unshard(parts, layout, dim)


def _ring(state, k, v, group, rank, world, cuda):
    """World steps: attend to the shard held, while it goes to rank + 1 and the next comes from rank - 1.

    K and V travel as one buffer; two buffers alternate, so a step receives into the one the
    previous step attended to. On CUDA the transfers run from a separate stream: it starts after
    the compute stream's work so far (the buffer to send is complete, the one to receive into is
    no longer read), and the compute stream waits for it before attending to what arrived.
    """
    if world == 1:
        state.attend(k, v, rank)
        return
    to_next = dist.get_global_rank(group, (rank + 1) % world)  # P2POp takes global ranks
    from_prev = dist.get_global_rank(group, (rank - 1) % world)
    bufs = [torch.stack((k, v)), None]
    bufs[1] = torch.empty_like(bufs[0])
    compute = torch.cuda.current_stream(k.device) if cuda else None
    comm = torch.cuda.Stream(k.device) if cuda else None
    for step in range(world):
        held, incoming = bufs[step % 2], bufs[(step + 1) % 2]
        works = []
        if step < world - 1:
            ops = [dist.P2POp(dist.isend, held, to_next, group), dist.P2POp(dist.irecv, incoming, from_prev, group)]
            if cuda:
                comm.wait_stream(compute)
                with torch.cuda.stream(comm):
                    works = dist.batch_isend_irecv(ops)
            else:
                works = dist.batch_isend_irecv(ops)
        state.attend(held[0], held[1], (rank - step) % world)
        if works:
            if cuda:
                with torch.cuda.stream(comm):
                    for w in works:
                        w.wait()  # the comm stream waits for NCCL; the host does not
                compute.wait_stream(comm)
            else:
                for w in works:
                    w.wait()


def _local_problem(q, k, v, layout, world):
    """An error message for this rank's inputs, or None; and the shape row shared with the other ranks."""
    shapes = [tuple(x.shape) for x in (q, k, v)]
    row = [-1] * 6
    if any(len(s) != 4 for s in shapes):
        return f"q_local, k_local, v_local: expected 4-D (B, n, H, D) tensors, got shapes {shapes}", row
    (B, n, Hq, D), (Bk, nk, Hkv, Dk) = shapes[0], shapes[1]
    row = [B, n, Hq, Hkv, D, world]
    if shapes[2] != shapes[1]:
        return f"v_local: expected the shape of k_local {shapes[1]}, got {shapes[2]}", row
    if (Bk, Dk) != (B, D) or nk != n:
        return (f"k_local: expected (B, n, Hkv, D) = ({B}, {n}, Hkv, {D}) like q_local (each rank holds the keys of "
                f"its own query positions), got {shapes[1]}"), row
    if Hkv < 1 or Hq % Hkv:
        return f"q_local, k_local: expected heads_q a multiple of heads_kv, got Hq={Hq}, Hkv={Hkv}", row
    devices = {str(x.device) for x in (q, k, v)}
    if len(devices) > 1:
        return f"q_local, k_local, v_local: expected one device, got {sorted(devices)}", row
    dtypes = {str(x.dtype) for x in (q, k, v)}
    if len(dtypes) > 1:
        return f"q_local, k_local, v_local: expected one dtype, got {sorted(dtypes)}", row
    per = chunks_per_rank(layout)
    unit = per * BLOCK_M
    if n == 0 or n % unit:
        return (f"q_local: a {layout} shard holds {per} chunk(s) that must each be a multiple of {BLOCK_M} "
                f"positions (calls start on tile boundaries: {BLOCK_M} queries, 64 keys); expected a shard "
                f"length that is a positive multiple of {unit}, got {n} (pad the sequence to a multiple of "
                f"{unit * world})"), row
    if q.is_cuda and q.device.index != torch.cuda.current_device():
        return (f"q_local: on {q.device}, but the current CUDA device is cuda:{torch.cuda.current_device()}; "
                "call torch.cuda.set_device(local_rank) before communicating (NCCL needs it)"), row
    return None, row


def _agree_on_shapes(q, k, v, layout, world, group):
    """Check this rank's inputs and that all ranks hold shards of one problem; raise on every rank if not."""
    problem, row = _local_problem(q, k, v, layout, world)
    # NCCL moves tensors of the current device only; a rank whose q sits elsewhere still takes part
    device = torch.device("cuda", torch.cuda.current_device()) if q.is_cuda else torch.device("cpu")
    mine = torch.tensor([0 if problem is None else 1] + row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    rows = [r.tolist() for r in rows]
    if problem is not None:
        raise ValueError(problem)
    refused = [r for r, x in enumerate(rows) if x[0]]
    if refused:
        raise ValueError(f"context_parallel_attention: rank(s) {refused} of the group refused their inputs "
                         "(their errors say why)")
    shapes = {tuple(x[1:]) for x in rows}
    if len(shapes) > 1:
        listing = ", ".join(f"rank {r}: (B, n, Hq, Hkv, D) = {tuple(x[1:6])}" for r, x in enumerate(rows))
        raise ValueError(f"context_parallel_attention: every rank must hold an equal shard of one problem, got "
                         f"{listing}")


def _thresholds_for(thresholds, q):
    """Thresholds as the local calls take them: on CUDA an array becomes one DeviceThresholds, validated and
    copied once instead of on each of the ring's calls; on the CPU a NumPy array. Scalars and None pass."""
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach()
        if not q.is_cuda or thresholds.dim() == 0:
            thresholds = thresholds.cpu().numpy()
    if not isinstance(thresholds, (np.ndarray, torch.Tensor)) or np.ndim(thresholds) == 0:
        return thresholds  # None, a scalar, or something the local call refuses with its own message
    from .device_thresholds import DeviceThresholds

    if not q.is_cuda:
        return thresholds
    if isinstance(thresholds, torch.Tensor):
        return DeviceThresholds(thresholds.to(device=q.device, dtype=torch.float32))
    return DeviceThresholds(thresholds, device=q.device.index)


def _check_thresholds(thresholds, q):
    """Refuse bad thresholds before the ring starts (every rank passes the same ones, so all refuse)."""
    Hq = q.shape[2]
    if q.is_cuda:
        from .device_thresholds import DeviceThresholds

        if isinstance(thresholds, DeviceThresholds) and thresholds.heads != Hq:
            raise ValueError(f"thresholds: expected {Hq} heads (q_local's Hq), got a DeviceThresholds of "
                             f"{thresholds.heads}")
    else:
        check_thresholds(thresholds, Hq)
    return thresholds
