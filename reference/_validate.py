"""Input checks shared by the reference functions: clear ValueError/TypeError, never assert."""
from __future__ import annotations

import numbers

import ml_dtypes
import numpy as np

#: dtypes the reference accepts for q, k and v (computation is always float64).
SUPPORTED_DTYPES = (
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)


def check_array(x, name: str) -> None:
    """Reject non-array and non-float inputs (no conversion, so checks can run before any copy)."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__cuda_array_interface__") or hasattr(x, "__dlpack_device__"):
            raise TypeError(
                f"{name}: the NumPy reference takes host numpy.ndarray inputs, got {type(x).__name__}; "
                "copy it to the host first or use bsfa_cupy.attention for GPU arrays"
            )
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.newbyteorder("=") not in SUPPORTED_DTYPES:  # byte order is storage, not type
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name}: expected dtype in ({names}), got {x.dtype}")


def check_flag(value, name: str) -> bool:
    """A Python or NumPy bool; anything else (``"False"``, 0, None) is a TypeError, not truthiness."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def check_block(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def check_qk(q: np.ndarray, k: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """Shapes of q (B, Nq, Hq, D) and k (B, Nk, Hkv, D); returns (B, Nq, Nk, Hq, Hkv, D)."""
    if q.ndim != 4:
        raise ValueError(f"q: expected rank 4 (batch, seqlen_q, heads_q, head_dim), got shape {q.shape}")
    if k.ndim != 4:
        raise ValueError(f"k: expected rank 4 (batch, seqlen_k, heads_kv, head_dim), got shape {k.shape}")
    B, Nq, Hq, D = q.shape
    Bk, Nk, Hkv, Dk = k.shape
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"q and k must have no empty dimension, got q {q.shape}, k {k.shape}")
    if Bk != B:
        raise ValueError(f"k: expected batch {B} (from q {q.shape}), got k {k.shape}")
    if Dk != D:
        raise ValueError(f"k: expected head_dim {D} (from q {q.shape}), got k {k.shape}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"heads: q heads ({Hq}) must be a multiple of k/v heads ({Hkv}); got q {q.shape}, k {k.shape}"
        )
    return B, Nq, Nk, Hq, Hkv, D


def check_v(v: np.ndarray, k: np.ndarray) -> None:
    if v.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"v: expected shape {k.shape} (same as k), got {v.shape}")


def softmax_scale_or_default(softmax_scale, D: int) -> float:
    """None -> 1/sqrt(D); else a finite real > 0 (the kernels take max(scale * s) as scale * max(s))."""
    if softmax_scale is None:
        return 1.0 / float(np.sqrt(D))
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    s = float(softmax_scale)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"softmax_scale: expected a finite float > 0 or None, got {s}")
    return s


def check_thresholds(thresholds, Hq: int):
    """None, a float32 scalar (0-d array), or a float32 (Hq, T) array. NaN is an error."""
    if thresholds is None:
        return None
    if isinstance(thresholds, bool) or isinstance(thresholds, np.bool_):
        raise TypeError("thresholds: expected None, a float scalar or an (Hq, T) float array, got bool")
    is_scalar = isinstance(thresholds, numbers.Real) or (
        isinstance(thresholds, np.generic) and thresholds.dtype == np.dtype(ml_dtypes.bfloat16)
    )
    if is_scalar:
        with np.errstate(over="ignore"):  # beyond float32 range is +-inf, as a float32 compare sees it
            t = np.asarray(np.float32(thresholds))
    elif isinstance(thresholds, np.ndarray):
        if thresholds.dtype.kind not in "fiu" and thresholds.dtype != np.dtype(ml_dtypes.bfloat16):
            raise TypeError(f"thresholds: expected a float array, got dtype {thresholds.dtype}")
        with np.errstate(over="ignore"):
            t = thresholds.astype(np.float32)
        if t.ndim == 0:
            pass
        elif t.ndim != 2 or t.shape[0] != Hq or t.shape[1] < 1:
            raise ValueError(f"thresholds: expected shape ({Hq}, T) with T >= 1 (or a scalar), got {t.shape}")
    else:
        raise TypeError(
            "thresholds: expected None, a float scalar or an (Hq, T) numpy array, "
            f"got {type(thresholds).__name__}"
        )
    if np.isnan(t).any():
        raise ValueError(f"thresholds: NaN is not a threshold ({int(np.isnan(t).sum())} NaN values); use -inf to keep all")
    return t


def check_cu_seqlens(cu, total: int, name: str) -> np.ndarray:
    """Cumulative sequence offsets of a packed (varlen) batch; returns the (num_seqs,) int64 lengths.

    FlashAttention's varlen layout: a 1-D int32 array of num_seqs + 1 offsets, starting at 0,
    non-decreasing, ending at the packed length ``total``. int32 exactly (no conversion), so that
    the same check can guard a host copy of what a kernel reads.
    """
    if not isinstance(cu, np.ndarray):
        raise TypeError(f"{name}: expected a 1-D numpy int32 array, got {type(cu).__name__}")
    if cu.dtype != np.dtype(np.int32):
        raise TypeError(f"{name}: expected dtype int32, got {cu.dtype}")
    if cu.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of num_seqs + 1 offsets, got shape {cu.shape}")
    if cu.size < 1:
        raise ValueError(f"{name}: expected length >= 1 (num_seqs + 1), got 0")
    if cu[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {int(cu[0])}")
    lengths = np.diff(cu.astype(np.int64))
    falls = np.flatnonzero(lengths < 0)
    if falls.size:
        i = int(falls[0]) + 1
        raise ValueError(
            f"{name}: expected non-decreasing offsets, got {name}[{i}] = {int(cu[i])} < "
            f"{name}[{i - 1}] = {int(cu[i - 1])}"
        )
    if int(cu[-1]) != total:
        raise ValueError(f"{name}: expected last entry {total} (the packed length), got {int(cu[-1])}")
    return lengths


def check_packed_shapes(q_shape, k_shape, v_shape) -> tuple[int, int, int]:
    """(Hq, Hkv, D) of packed q (total_q, Hq, D), k and v (total_k, Hkv, D), or ValueError; shapes only, so
    the NumPy reference and the GPU API refuse alike."""
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    if len(q_shape) != 3:
        raise ValueError(f"q: expected rank 3 (total_q, heads_q, head_dim), got shape {q_shape}")
    if len(k_shape) != 3:
        raise ValueError(f"k: expected rank 3 (total_k, heads_kv, head_dim), got shape {k_shape}")
    _, Hq, D = q_shape
    _, Hkv, Dk = k_shape
    # the packed lengths may be 0 (every sequence empty); heads and head_dim may not
    if min(Hq, D, Hkv, Dk) < 1:
        raise ValueError(f"q and k: expected heads and head_dim >= 1, got q {q_shape}, k {k_shape}")
    if Dk != D:
        raise ValueError(f"k: expected head_dim {D} (from q {q_shape}), got k {k_shape}")
    if Hq % Hkv != 0:
        raise ValueError(f"heads: q heads ({Hq}) must be a multiple of k/v heads ({Hkv}); got q {q_shape}, k {k_shape}")
    if v_shape != k_shape:
        raise ValueError(f"v: expected shape {k_shape} (same as k), got {v_shape}")
    return Hq, Hkv, D


def check_cu_seqlens_pair(cu_q, cu_k, total_q: int, total_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Both offset arrays of a varlen call; returns the (num_seqs,) query and key lengths."""
    len_q = check_cu_seqlens(cu_q, total_q, "cu_seqlens_q")
    len_k = check_cu_seqlens(cu_k, total_k, "cu_seqlens_k")
    if len_k.size != len_q.size:
        raise ValueError(
            f"cu_seqlens_k: expected length {cu_q.size} (the same number of sequences as cu_seqlens_q), "
            f"got {cu_k.size}"
        )
    return len_q, len_k


def check_max_seqlen(value, longest: int, name: str, what: str) -> int:
    """None -> ``longest``; else an int >= ``longest`` (larger only pads the keep layout)."""
    if value is None:
        return longest
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int or None, got {type(value).__name__} {value!r}")
    if value < longest:
        raise ValueError(f"{name}: expected an int >= {longest} (the longest {what}), got {int(value)}")
    return int(value)


def check_offsets(q_start, k_start, Nq: int, Nk: int, block_m: int | None = None,
                  block_n: int | None = None) -> tuple[int, int]:
    """Absolute positions (q0, k0) of a call's first query and first key; q_start None is bottom-right.

    Explicit offsets must be multiples of the tile sizes (when given): tiles start at the call's
    own row 0 / key 0, and only aligned offsets make them the full problem's tiles, which is what
    lets split calls keep exactly the full call's tiles. The bottom-right default is exempt: it
    is the unsplit call's geometry, whatever Nk - Nq is.
    """
    k0 = _check_offset(k_start, "k_start", block_n, "block_n")
    if q_start is None:
        return k0 + Nk - Nq, k0
    return _check_offset(q_start, "q_start", block_m, "block_m"), k0


def _check_offset(value, name: str, block: int | None, block_name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        what = "an int >= 0 or None" if name == "q_start" else "an int >= 0"
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    if block is not None and value % block:
        raise ValueError(
            f"{name}: expected a multiple of {block_name} = {block} (split calls must start on a tile "
            f"boundary of the full problem), got {value}"
        )
    return value
