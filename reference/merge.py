"""Combining partial attention results over disjoint key sets (split-KV, context parallelism)."""
from __future__ import annotations

import numpy as np

from ._validate import check_array


def merge_partials(outs, lses):
    """Merge partial results of the same queries over disjoint key sets, in float64.

    ``outs[c]`` and ``lses[c]`` are what :func:`attention` returned (``return_lse=True``) for
    the c-th part of the keys, e.g. calls with ``k_start`` at each part of a split sequence; out
    has the layout (..., N, H, D) and lse (..., H, N): (B, Nq, Hq, D) and (B, Hq, Nq) from
    :func:`attention`, (total_q, Hq, D) and (Hq, total_q) from :func:`attention_varlen`.

    This is the rule every sharded or split-KV implementation must follow. Per row:

    * lse = log(sum_c exp(lse_c)), computed as m + log(sum_c exp(lse_c - m)) with m = max_c lse_c;
    * out = sum_c exp(lse_c - lse) * out_c.

    Parts with lse_c = -inf (no kept valid key) weigh 0; a row where every part is -inf keeps
    lse = -inf and out = sum_c 0 * out_c, i.e. 0, or NaN where a part's out is non-finite (as
    the unsplit call's P @ V gives for a kept tile with a non-finite v). Weights multiply out_c
    with IEEE semantics, so NaN in a weighted out_c stays NaN. A row where some part has lse NaN
    (a NaN or +inf kept score) or +inf gets lse = NaN and out = NaN in every column, as the
    unsplit call does. A single part comes back with its own values (as float64).

    Args:
        outs: a non-empty list or tuple of float numpy arrays of one shape (..., N, H, D).
        lses: a list or tuple of as many float numpy arrays of shape (..., H, N).

    Returns:
        out (..., N, H, D) float64 and lse (..., H, N) float64.
    """
    outs, lses = _check_parts(outs, lses)
    L = np.stack([x.astype(np.float64) for x in lses])  # (C, ..., H, N)
    O = np.stack([x.astype(np.float64) for x in outs])  # (C, ..., N, H, D)
    poisoned = (np.isnan(L) | (L == np.inf)).any(axis=0)
    L = np.where(poisoned, -np.inf, L)  # kept out of the sums; marked below
    m = L.max(axis=0)
    empty = m == -np.inf
    shift = np.where(empty, 0.0, m)
    with np.errstate(divide="ignore"):
        lse = shift + np.log(np.exp(L - shift).sum(axis=0))
    lse[empty] = -np.inf
    w = np.exp(L - np.where(empty, 0.0, lse))  # lse_c = -inf weighs exp(-inf) = 0
    w = np.swapaxes(w, -1, -2)[..., None]  # (C, ..., N, H, 1)
    with np.errstate(invalid="ignore"):  # 0 * inf = NaN is the intended result
        out = (w * O).sum(axis=0)
    lse[poisoned] = np.nan
    out[np.swapaxes(poisoned, -1, -2)] = np.nan
    return out, lse


def _check_parts(outs, lses):
    for name, parts in (("outs", outs), ("lses", lses)):
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"{name}: expected a list or tuple of numpy arrays, got {type(parts).__name__}")
    if len(outs) == 0:
        raise ValueError("outs: expected at least one partial result, got 0")
    if len(lses) != len(outs):
        raise ValueError(f"lses: expected {len(outs)} arrays (one per entry of outs), got {len(lses)}")
    for c, (o, l) in enumerate(zip(outs, lses)):
        check_array(o, f"outs[{c}]")
        check_array(l, f"lses[{c}]")
    shape = outs[0].shape
    if len(shape) < 3 or min(shape) < 1:
        raise ValueError(f"outs[0]: expected shape (..., N, H, D) with no empty dimension, got {shape}")
    for c, o in enumerate(outs):
        if o.shape != shape:
            raise ValueError(f"outs[{c}]: expected shape {shape} (that of outs[0]), got {o.shape}")
    lse_shape = shape[:-3] + (shape[-2], shape[-3])
    for c, l in enumerate(lses):
        if l.shape != lse_shape:
            raise ValueError(f"lses[{c}]: expected shape {lse_shape} (..., H, N) from outs {shape}, got {l.shape}")
    return outs, lses
