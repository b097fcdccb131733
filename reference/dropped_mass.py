"""The softmax mass a gate drops, and the per-layer k rule that equalises it across layers.

Dropped mass of a query row: the share of its dense softmax mass (over every valid key) that lies on
keys of tiles the gate skips, ``1 - exp(lse_kept - lse_dense)`` with the lse of :func:`attention`;
0 for a row with no valid key. It is what the renormalised sparse softmax loses before renormalising,
so it bounds how far the row's output can move (by twice it times max |v|).

Per-layer k (the "layer-k" gate rule): a single k drops very different mass in different layers, so
instead of one k for all, each layer gets the smallest calibrated k whose mean dropped mass on the
calibration texts stays within one target; sweeping the target traces the rule's quality/sparsity
curve. Exactly: ``mass[l, i]`` is the mean, over every query row of every head and calibration sample,
of layer l's dropped mass when the model runs BSFA with ``k_values[i]`` in every layer; layer l gets
``min{k_values[i] : mass[l, i] <= target}``, or None (no thresholds: dense) when no k qualifies.
"""
from __future__ import annotations

import numbers

import numpy as np
from scipy.special import logsumexp

from ._validate import check_thresholds
from .attention import _check_inputs, _gate, _scores
from .calibration import check_k_values
from .tiles import BLOCK_M, BLOCK_N, tile_reduce_any, tile_reduce_max, valid_mask_at


def dropped_mass(q, k, tables, *, causal=True, softmax_scale=None, block_m=BLOCK_M, block_n=BLOCK_N):
    """(len(tables), B, Hq, Nq) float64: each row's dropped softmax mass under each thresholds entry.

    q (B, Nq, Hq, D), k (B, Nk, Hkv, D) as for :func:`attention` (bottom-right causal mask, the same
    gate); ``tables``: a list or tuple of thresholds as :func:`attention` takes them (None, a scalar or
    an (Hq, T) array). The scores are computed once for all entries. Finite q and k only.
    """
    shape, scale, causal, block_m, block_n = _check_inputs(q, k, causal, softmax_scale, block_m, block_n)
    B, Nq, Nk, Hq, Hkv, D = shape
    if not isinstance(tables, (list, tuple)):
        raise TypeError(f"tables: expected a list or tuple of thresholds (None, scalar or (Hq, T) arrays), got "
                        f"{type(tables).__name__}")
    thrs = [check_thresholds(t, Hq) for t in tables]
    s, finite = _scores(q.astype(np.float64), k.astype(np.float64), scale, Hq, Hkv, rows_contiguous=True)
    if not finite:
        raise ValueError(f"q and k: expected finite scores, got {int((~np.isfinite(s)).sum())} non-finite")
    q0, k0 = Nk - Nq, 0  # bottom-right, the default placement of attention()
    valid = valid_mask_at(Nq, Nk, causal, q0, k0)
    np.copyto(s, -np.inf, where=~valid)
    cand = tile_reduce_any(valid, block_m, block_n)
    tile_max = tile_reduce_max(s, block_m, block_n)
    with np.errstate(divide="ignore"):
        lse_dense = logsumexp(s, axis=-1)
    rows = np.arange(Nq)[:, None] // block_m
    cols = np.arange(Nk)[None, :] // block_n
    out = np.zeros((len(thrs), B, Hq, Nq))
    has_key = lse_dense > -np.inf
    for i, thr in enumerate(thrs):
        keep = _gate(tile_max, thr, cand, Nq, Nk, block_m, block_n, q0, k0)
        kept_scores = np.where(keep[..., rows, cols], s, -np.inf)
        with np.errstate(divide="ignore"):
            lse_kept = logsumexp(kept_scores, axis=-1)
        out[i] = np.where(has_key, -np.expm1(np.minimum(lse_kept - np.where(has_key, lse_dense, 0.0), 0.0)), 0.0)
    return out


def layer_k_for_mass(mass, k_values, target) -> list:
    """Per layer, the smallest k of ``k_values`` whose mean dropped mass is at most ``target`` (None: no k).

    mass: (layers, len(k_values)) mean dropped mass (see the module docstring); target: a float in [0, 1].
    """
    ks = check_k_values(k_values)
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not (0.0 <= float(target) <= 1.0):
        raise ValueError(f"target: expected a dropped mass in [0, 1], got {target!r}")
    m = np.asarray(mass, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != len(ks):
        raise ValueError(f"mass: expected shape (layers, {len(ks)}) (one column per k), got {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any() or (m > 1).any():
        raise ValueError(f"mass: expected values in [0, 1], got min {np.nanmin(m)!r} max {np.nanmax(m)!r} "
                         f"({int((~np.isfinite(m)).sum())} non-finite)")
    order = np.argsort(ks)
    out = []
    for row in m:
        ok = [ks[i] for i in order if row[i] <= float(target)]
        out.append(ok[0] if ok else None)
    return out
