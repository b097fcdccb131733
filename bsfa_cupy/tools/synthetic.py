"""Synthetic long-context attention inputs with the structure real LLM layers show.

Three components, all in float32 NumPy on the host:
- attention sinks: the first ``n_sink`` keys share a direction every query leans towards;
- a local window: rotary-style positional features make q_i . k_j peak near j = i;
- planted needles: a few keys far back are aligned with one specific late query each, and carry a
  distinctive value vector, so whether a sparse method still retrieves them can be checked.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


#: attention-sink keys at the start of every sample; a sample needs at least one more position
N_SINK = 4
MIN_N = N_SINK + 1


@dataclass
class Sample:
    q: np.ndarray  # (B, N, Hq, D) float32
    k: np.ndarray  # (B, N, Hkv, D)
    v: np.ndarray  # (B, N, Hkv, D)
    needles: np.ndarray  # (n, 4) int: batch, query head, query row, key row


def make_sample(n: int, *, batch=1, hq=4, hkv=1, d=64, n_sink=N_SINK, n_needles=4, seed=0,
                sink=3.0, local=2.5, needle=6.0, noise=1.0, xp=np) -> Sample:
    """One draw of the synthetic distribution; ``seed`` picks noise and needle placement.

    ``xp=cupy`` builds the arrays on the GPU (same structure, other random noise).
    """
    if n <= n_sink:  # needles are planted after the sinks
        raise ValueError(f"n: expected a sequence longer than its {n_sink} attention-sink keys, got {n}")
    rng = np.random.default_rng(seed)
    noise_rng = xp.random.default_rng(seed)
    group = hq // hkv
    # Fixed structure (same for every sample of the distribution): sink direction, frequencies.
    struct = np.random.default_rng(12345)
    sink_dir = _unit(struct.standard_normal((hkv, d)))
    n_freq = max(d // 8, 1)
    freqs = 1.0 / (64.0 ** (np.arange(n_freq) / n_freq)) * 0.05
    pos = np.arange(n)[:, None] * freqs[None, :]
    rot = np.concatenate([np.cos(pos), np.sin(pos)], axis=1) / np.sqrt(n_freq)  # (n, 2 n_freq)

    scale_d = d**0.25  # scores are divided by sqrt(d): put sqrt(d) of magnitude on each side
    q = noise_rng.standard_normal((batch, n, hq, d), dtype=np.float32) * np.float32(noise / scale_d)
    k = noise_rng.standard_normal((batch, n, hkv, d), dtype=np.float32) * np.float32(noise / scale_d)
    v = noise_rng.standard_normal((batch, n, hkv, d), dtype=np.float32)
    width = 2 * n_freq
    rot = xp.asarray(rot.astype(np.float32))
    q[..., :width] += np.float32(local * scale_d) * rot[None, :, None, :]
    k[..., :width] += np.float32(local * scale_d) * rot[None, :, None, :]
    q += xp.asarray((sink * scale_d * 0.5 * np.repeat(sink_dir, group, axis=0)).astype(np.float32))[None, None]
    k[:, :n_sink] += xp.asarray((sink * scale_d * 0.5 * sink_dir).astype(np.float32))[None, None]

    needles = []
    for _ in range(n_needles):
        b, h = rng.integers(batch), rng.integers(hq)
        i = int(rng.integers(n // 2, n))
        j = int(rng.integers(n_sink, max(n_sink + 1, i // 4)))
        hk = h // group
        k[b, j, hk] = needle * scale_d * _unit(q[b, i, h]) + k[b, j, hk] * 0.1
        v[b, j, hk] = xp.asarray(4.0 * _unit(rng.standard_normal(d)), dtype=np.float32)
        needles.append((b, h, i, j))
    return Sample(q, k, v, np.array(needles, dtype=np.int64).reshape(-1, 4))


def needle_retrieved(out_sparse, out_dense, v, needles, hq) -> np.ndarray:
    """Per needle: does the sparse output keep at least half of the needle value's dense share?"""
    hkv = v.shape[2]
    hits = []
    for b, h, i, j in needles:
        marker = v[b, j, h // (hq // hkv)].astype(np.float64)
        marker /= np.linalg.norm(marker)
        dense = float(np.dot(out_dense[b, i, h], marker))
        sparse = float(np.dot(out_sparse[b, i, h], marker))
        hits.append(sparse >= 0.5 * dense if dense > 0 else True)
    return np.array(hits, dtype=bool)


def _unit(x):
    return x / (x * x).sum(axis=-1, keepdims=True) ** 0.5
