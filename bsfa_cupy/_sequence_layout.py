"""How a sequence is cut across the ranks of a context-parallel group: chunk positions, shard, unshard.

Works on NumPy arrays and torch tensors alike (slicing, and one concatenation), without importing torch.
"""
from __future__ import annotations

from typing import NamedTuple

LAYOUTS = ("zigzag", "contiguous")


class Span(NamedTuple):
    """One chunk of a rank's shard: ``length`` positions at ``local`` in the shard, ``start`` in the sequence."""

    local: int
    start: int
    length: int


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def check_rank(rank, world) -> tuple[int, int]:
    for name, value in (("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if world < 1:
        raise ValueError(f"world: expected an int >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world = {world}, got {rank}")
    return rank, world


def chunks_per_rank(layout: str) -> int:
    """zigzag holds two chunks per rank (one from each end of the sequence); contiguous one."""
    return 2 if check_layout(layout) == "zigzag" else 1


def spans(rank: int, world: int, n_local: int, layout: str) -> list[Span]:
    """The chunks of rank ``rank``'s shard of ``n_local`` positions, in shard order.

    zigzag cuts the sequence into 2 * world chunks of n_local / 2 and gives rank r chunks r and
    2 * world - 1 - r: under a causal mask every rank then holds the same amount of work (an early
    chunk with little to attend to and a late one with much). contiguous gives rank r the r-th
    world-th of the sequence.
    """
    rank, world = check_rank(rank, world)
    per = chunks_per_rank(layout)
    if n_local % per:
        raise ValueError(f"a {layout} shard holds {per} equal chunks; expected a length divisible by {per}, "
                         f"got {n_local}")
    c = n_local // per
    if layout == "contiguous":
        return [Span(0, rank * n_local, n_local)]
    return [Span(0, rank * c, c), Span(c, (2 * world - 1 - rank) * c, c)]


def _take(x, dim: int, lo: int, hi: int):
    return x[(slice(None),) * dim + (slice(lo, hi),)]


def _cat(parts, dim: int):
    if type(parts[0]).__module__.startswith("torch"):
        import torch

        return torch.cat(parts, dim=dim)
    import numpy as np

    return np.concatenate(parts, axis=dim)


def _check_dim(x, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__} {dim!r}")
    ndim = len(x.shape)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim: expected an axis of a {ndim}-dimensional array, got {dim}")
    return dim % ndim


def shard(x, rank: int, world: int, layout: str = "zigzag", dim: int = 1):
    """Rank ``rank``'s shard of the sequence axis ``dim`` of ``x`` (a NumPy array or torch tensor).

    zigzag: the axis is cut into 2 * world equal chunks and the rank gets chunks rank and
    2 * world - 1 - rank, concatenated (a new array). contiguous: the rank-th of world equal
    parts (a view). The length along ``dim`` must divide evenly. For attention, the chunks must
    also be multiples of 128 positions (see :func:`context_parallel_attention`).
    """
    rank, world = check_rank(rank, world)
    dim = _check_dim(x, dim)
    n = x.shape[dim]
    parts = world * chunks_per_rank(layout)
    if n % parts:
        raise ValueError(f"x: a {layout} layout over {world} ranks cuts axis {dim} into {parts} equal chunks; "
                         f"expected a length divisible by {parts}, got {n}")
    pieces = [_take(x, dim, s.start, s.start + s.length) for s in spans(rank, world, n // world, layout)]
    return pieces[0] if len(pieces) == 1 else _cat(pieces, dim)


def unshard(parts, layout: str = "zigzag", dim: int = 1):
    """The whole sequence from every rank's shard (``parts[r]`` from rank r), the inverse of :func:`shard`."""
    if not isinstance(parts, (list, tuple)) or not parts:
        raise TypeError(f"parts: expected a non-empty list of shards, one per rank, got {type(parts).__name__}")
    world = len(parts)
    dim = _check_dim(parts[0], dim)
    shape = tuple(parts[0].shape)
    for r, p in enumerate(parts):
        if tuple(p.shape) != shape:
            raise ValueError(f"parts[{r}]: expected shape {shape} (that of parts[0]), got {tuple(p.shape)}")
    n_local = shape[dim]
    pieces = [None] * (world * chunks_per_rank(layout))
    for r, p in enumerate(parts):
        for s in spans(r, world, n_local, layout):
            pieces[s.start // s.length] = _take(p, dim, s.local, s.local + s.length)
    return pieces[0] if len(pieces) == 1 else _cat(pieces, dim)
