"""One rank's share of context-parallel attention: its query chunks against one shard of keys at a time.

The ring (``bsfa_cupy.distributed``) hands each rank every key/value shard in turn; this module
computes the (query chunk, key chunk) pairs of one shard with absolute offsets and merges the
partial results by LSE, with no communication, so that a ring simulated in one process runs the
same code.
"""
from __future__ import annotations

import math

import numpy as np
import torch

import bsfa_reference
from bsfa_reference.tiles import BLOCK_M, BLOCK_N

from ._sequence_layout import Span, spans


def fully_masked(q: Span, k: Span, causal: bool) -> bool:
    """Every key of ``k`` lies after every query of ``q``: the pair has no valid entry."""
    return causal and k.start > q.start + q.length - 1


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partials merge in float32 at least (float64 inputs keep float64)."""
    return torch.promote_types(dtype, torch.float32)


def merge_into(acc_out, acc_lse, out, lse):
    """Fold one partial (out (B, n, H, D), lse (B, H, n)) into the running (acc_out, acc_lse), in place.

    The rule of ``bsfa_reference.merge_partials`` applied two at a time: weights exp(lse_c - lse)
    with lse the log-sum-exp of both; an lse of -inf weighs 0 (both -inf: lse -inf, out the sum
    of 0 * out_c, which keeps a NaN of a part); an lse of NaN or +inf on either side makes the
    row NaN in lse and in every column of out, for good.
    """
    inf = math.inf
    lse = lse.to(acc_lse.dtype)
    poisoned = torch.isnan(acc_lse) | (acc_lse == inf) | torch.isnan(lse) | (lse == inf)
    a = acc_lse.masked_fill(poisoned, -inf)
    b = lse.masked_fill(poisoned, -inf)
    m = torch.maximum(a, b)
    empty = m == -inf
    shift = m.masked_fill(empty, 0.0)
    new = shift + torch.log(torch.exp(a - shift) + torch.exp(b - shift))
    base = new.masked_fill(empty, 0.0)  # empty rows: exp(-inf - 0) = 0 for both weights
    # A poisoned row's weight is NaN, which makes every column of it NaN in the same two passes over
    # acc_out (the out-sized tensors are what a merge costs; the lse-sized ones are D times smaller)
    w_acc = torch.exp(a - base).masked_fill(poisoned, math.nan).transpose(-1, -2).unsqueeze(-1)
    w_new = torch.exp(b - base).transpose(-1, -2).unsqueeze(-1)
    acc_out.mul_(w_acc).addcmul_(out, w_new)
    acc_lse.copy_(new.masked_fill(empty, -inf).masked_fill(poisoned, math.nan))


def kernel_call(q, k, v, thresholds, *, causal, softmax_scale, q_start, k_start, want_keep):
    """One (query chunk, key chunk) pair on the GPU: ``bsfa_cupy.attention`` with absolute offsets."""
    from .ops import attention

    return attention(q, k, v, thresholds, causal=causal, softmax_scale=softmax_scale, q_start=q_start,
                     k_start=k_start, return_lse=True, return_keep=want_keep)


def reference_call(q, k, v, thresholds, *, causal, softmax_scale, q_start, k_start, want_keep):
    """The same pair on CPU tensors: the float64 reference on NumPy copies (exact, slow)."""
    res = bsfa_reference.attention(_host(q), _host(k), _host(v), thresholds, causal=causal,
                                   softmax_scale=softmax_scale, q_start=q_start, k_start=k_start, return_lse=True,
                                   return_keep=want_keep)
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in res)


def _host(x: torch.Tensor) -> np.ndarray:
    x = x.detach()
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds every bfloat16 exactly
        x = x.float()
    return x.cpu().numpy()


class RankAttention:
    """The running result of rank ``rank``'s queries, fed one key/value shard at a time.

    ``attend(k, v, src)`` takes the shard of rank ``src`` (same layout and length as the
    queries') and computes every (query chunk, key chunk) pair that is not fully masked with
    ``call`` at the chunks' absolute positions, merging into float32 (float64 for float64 inputs)
    accumulators; ``result()`` gives out (q's dtype), lse and, if asked, keep (B, Hq,
    n_local / 128, world * n_local / 64): the rank's query tiles against every key tile of the
    sequence, False for pairs never computed.
    """

    def __init__(self, q, thresholds, *, rank, world, layout, causal, softmax_scale, want_keep, call):
        B, n, Hq, D = q.shape
        self.q, self.thresholds, self.causal, self.softmax_scale = q, thresholds, causal, softmax_scale
        self.rank, self.world, self.layout, self.call, self.want_keep = rank, world, layout, call, want_keep
        self.spans = spans(rank, world, n, layout)
        acc = accumulator_dtype(q.dtype)
        self.out = torch.zeros((B, n, Hq, D), dtype=acc, device=q.device)
        self.lse = torch.full((B, Hq, n), -math.inf, dtype=acc, device=q.device)
        self.started = [False] * len(self.spans)
        self.keep = None
        if want_keep:
            self.keep = torch.zeros((B, Hq, n // BLOCK_M, world * n // BLOCK_N), dtype=torch.bool, device=q.device)
        self.pairs_computed: list[tuple[int, int]] = []  # (q_start, k_start) of every call, for tests

    def pairs(self, src: int) -> list[tuple[int, Span, Span]]:
        """(index of the query chunk, query chunk, key chunk) for the pairs of shard ``src`` to compute."""
        k_spans = spans(src, self.world, self.q.shape[1], self.layout)
        return [(i, qs, ks) for i, qs in enumerate(self.spans) for ks in k_spans
                if not fully_masked(qs, ks, self.causal)]

    def attend(self, k, v, src: int) -> None:
        for i, qs, ks in self.pairs(src):
            rows = slice(qs.local, qs.local + qs.length)
            keys = slice(ks.local, ks.local + ks.length)
            res = self.call(self.q[:, rows], k[:, keys], v[:, keys], self.thresholds, causal=self.causal,
                            softmax_scale=self.softmax_scale, q_start=qs.start, k_start=ks.start,
                            want_keep=self.want_keep)
            self.pairs_computed.append((qs.start, ks.start))
            out, lse = res[0], res[1]
            acc_out, acc_lse = self.out[:, rows], self.lse[:, :, rows]
            if self.started[i]:
                merge_into(acc_out, acc_lse, out, lse)
            else:  # a single part is its own result (merge_partials of one part)
                acc_out.copy_(out)
                acc_lse.copy_(lse)
                self.started[i] = True
            if self.want_keep:
                t0, c0 = qs.local // BLOCK_M, ks.start // BLOCK_N
                self.keep[:, :, t0:t0 + qs.length // BLOCK_M, c0:c0 + ks.length // BLOCK_N] = res[2]

    def result(self):
        """out (B, n, Hq, D) in q's dtype, lse (B, Hq, n) in the accumulator dtype, keep or None."""
        if not all(self.started):  # cannot happen: every query chunk meets its own keys
            raise RuntimeError("context-parallel attention: a query chunk received no key chunk")
        return self.out.to(self.q.dtype), self.lse, self.keep
