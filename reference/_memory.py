"""Peak-memory estimates of the reference, and the guard that refuses inputs above a bound.

The reference materialises (B, Hq, Nq, Nk) float64 score arrays; a long sequence would otherwise
run the host out of memory (or into swap) before failing. The estimates count the arrays alive at
the peak (see the functions) and were checked against tracemalloc on NumPy 2.4 / SciPy 1.17.
"""
from __future__ import annotations

import os

from .tiles import BLOCK_N

#: the bound when BSFA_REFERENCE_MAX_BYTES is not set
DEFAULT_MAX_BYTES = 4 * 2**30
MAX_BYTES_ENV = "BSFA_REFERENCE_MAX_BYTES"


def max_bytes() -> int:
    """The bound: ``BSFA_REFERENCE_MAX_BYTES`` (a byte count) if set, else 4 GiB."""
    text = os.environ.get(MAX_BYTES_ENV)
    if text is None or not text.strip():
        return DEFAULT_MAX_BYTES
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{MAX_BYTES_ENV}: expected a whole number of bytes, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{MAX_BYTES_ENV}: expected a positive number of bytes, got {value}")
    return value


def _inputs(B, Nq, Nk, Hq, Hkv, D) -> int:
    """Elements of q (or out), k and v, and k or v repeated to Hq heads (GQA)."""
    return B * D * (Nq * Hq + Nk * (Hq + 2 * Hkv))


def _common(B, Nq, Nk, Hq, Hkv, D) -> int:
    """Bytes next to the score arrays: the (Nq, Nk) bool mask and its negation; up to four float64
    copies of the inputs (as float64, with non-finite entries zeroed, finiteness masks); one chunk
    of q*k products with its gathered operand and masks when scores of non-finite inputs are
    classified (counted always: whether the inputs are finite is not looked at before the check)."""
    from .attention import NONFINITE_CHUNK

    return 2 * Nq * Nk + 4 * 8 * _inputs(B, Nq, Nk, Hq, Hkv, D) + 24 * NONFINITE_CHUNK


def attention_bytes(B, Nq, Nk, Hq, Hkv, D, block_n=BLOCK_N) -> int:
    """Peak bytes of :func:`bsfa_reference.attention`: S = B*Hq*Nq*Nk scores cost 17 S bytes (the
    float64 scores, exp(s - m) then P computed in place in a second array, and one bool array: the
    skipped entries, or those at the row maximum), plus 8 bytes per (row, key tile) for the first
    step of the tile maxima, plus :func:`_common`. Measured peaks (tracemalloc at 2M to 8M scores,
    ru_maxrss at 67M): 17.1 to 19.5 bytes per score, each below this estimate."""
    S = B * Hq * Nq * Nk
    return 17 * S + 8 * B * Hq * Nq * -(-Nk // block_n) + _common(B, Nq, Nk, Hq, Hkv, D)


def block_max_bytes(B, Nq, Nk, Hq, Hkv, D, block_n=BLOCK_N) -> int:
    """Peak bytes of :func:`bsfa_reference.block_max_scores`: one float64 score array (scaled and
    masked in place), the (B, Hq, Nq, nK) row maxima, plus :func:`_common`."""
    S = B * Hq * Nq * Nk
    return 8 * S + 8 * B * Hq * Nq * -(-Nk // block_n) + _common(B, Nq, Nk, Hq, Hkv, D)


def check_memory(nbytes: int, what: str, shapes: str, way_out: str) -> None:
    """ValueError when ``nbytes`` exceeds the bound, naming both and the way out."""
    bound = max_bytes()
    if nbytes > bound:
        raise ValueError(
            f"{what}: expected inputs that fit in {_gib(bound)} of host memory "
            f"({MAX_BYTES_ENV}), got {shapes} needing about {_gib(nbytes)} at the peak; {way_out}, "
            f"or set {MAX_BYTES_ENV} to a larger byte count"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def attention_varlen_bytes(len_q, len_k, Hq, Hkv, D, n_q_tiles, n_k_tiles, block_n=BLOCK_N) -> tuple[int, int]:
    """Peak bytes of :func:`bsfa_reference.attention_varlen`, and the sequence that sets it.

    Sequences run one at a time, so the peak is the largest :func:`attention_bytes` of one
    sequence (B = 1) plus the packed outputs alive throughout: out (total_q, Hq, D) and lse
    (Hq, total_q) float64, keep (num_seqs, Hq, n_q_tiles, n_k_tiles) bool. Python ints: Nq * Nk
    of a long sequence times 17 can pass int64.
    """
    worst, at = 0, -1
    for s, (nq, nk) in enumerate(zip(len_q.tolist(), len_k.tolist())):
        if nq and nk:
            b = attention_bytes(1, nq, nk, Hq, Hkv, D, block_n)
            if b > worst:
                worst, at = b, s
    total_q = int(sum(len_q.tolist()))
    outputs = 8 * total_q * Hq * (D + 1) + len(len_q) * Hq * n_q_tiles * n_k_tiles
    return worst + outputs, at
