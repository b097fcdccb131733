"""Compiled kernel variants: one specialisation key per module, compiled lazily and cached.

What must be compile-time (dtype, head dim, causal, and the tuning knobs: V-load order, K ring depth, ...) is a macro of the key; cheap
choices (threshold mode, keep-mask output) are run-time arguments, so the variant count stays
small. CuPy caches compiled modules on disk keyed by the source string and options, and the
source string already holds every header (see ``_source``).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from ._backend import cupy
from ._source import kernel_source

#: Query rows x keys per tile; the kernel's traits struct holds the same numbers.
BLOCK_M = 128
BLOCK_N = 64
HEAD_DIMS = (32, 64, 96, 128)
DTYPES = {"float16": 0, "bfloat16": 1}
SOURCE = "bsfa_fwd.cu"


@dataclass(frozen=True)
class VariantKey:
    """Everything compile-time about one kernel module."""

    dtype: str  # "float16" | "bfloat16"
    head_dim: int
    causal: bool
    # Tuning knobs (kernels_cu/bsfa_fwd.cu documents each macro); defaults are the fastest measured
    # (bench/NOTES.md, v3) and equal the macros' defaults in the source.
    v_speculative: bool = False  # BSFA_V_SPECULATIVE
    heavy_first: bool = True  # BSFA_HEAVY_FIRST
    k_stages: int = 3  # BSFA_K_STAGES (3 needs v_speculative=False)
    v_forced_early: bool = True  # BSFA_V_FORCED_EARLY
    pv_unroll: bool = False  # BSFA_PV_UNROLL (no effect at head_dim 128)
    fast_loads: bool = True  # BSFA_FAST_LOADS (off is 1-2% faster on H200 but spills 4 B at hdim 128 on sm_80)
    qk_pingpong: bool = True  # BSFA_QK_PINGPONG (head_dim 96/128 only)
    pv_pingpong: bool = True  # BSFA_PV_PINGPONG (rolled P V loop only)

    def __post_init__(self):
        if self.k_stages not in (2, 3):
            raise ValueError(f"k_stages must be 2 or 3, got {self.k_stages!r}")
        if self.k_stages == 3 and self.v_speculative:
            raise ValueError("k_stages=3 needs v_speculative=False (pass k_stages=2 with v_speculative=True)")

    def options(self) -> tuple[str, ...]:
        return (
            "-std=c++17",
            f"-DBSFA_DTYPE={DTYPES[self.dtype]}",
            f"-DBSFA_HEAD_DIM={self.head_dim}",
            f"-DBSFA_CAUSAL={int(self.causal)}",
            f"-DBSFA_V_SPECULATIVE={int(self.v_speculative)}",
            f"-DBSFA_HEAVY_FIRST={int(self.heavy_first)}",
            f"-DBSFA_K_STAGES={int(self.k_stages)}",
            f"-DBSFA_V_FORCED_EARLY={int(self.v_forced_early)}",
            f"-DBSFA_PV_UNROLL={int(self.pv_unroll)}",
            f"-DBSFA_FAST_LOADS={int(self.fast_loads)}",
            f"-DBSFA_QK_PINGPONG={int(self.qk_pingpong)}",
            f"-DBSFA_PV_PINGPONG={int(self.pv_pingpong)}",
        )

    def name(self) -> str:
        base = f"bsfa_{self.dtype}_d{self.head_dim}_{'causal' if self.causal else 'full'}"
        defaults = VariantKey(self.dtype, self.head_dim, self.causal)
        tuned = [f"{k}={getattr(self, k)}" for k in TUNING_KNOBS if getattr(self, k) != getattr(defaults, k)]
        return base + (f"[{','.join(tuned)}]" if tuned else "")


def all_variants() -> list[VariantKey]:
    return [VariantKey(dt, d, c) for dt in DTYPES for d in HEAD_DIMS for c in (False, True)]


#: Compile-time tuning knobs applied to every key built by the API (for benchmarking variants).
_TUNING: dict = {}
#: The VariantKey fields that tuning() accepts.
TUNING_KNOBS = (
    "v_speculative",
    "heavy_first",
    "k_stages",
    "v_forced_early",
    "pv_unroll",
    "fast_loads",
    "qk_pingpong",
    "pv_pingpong",
)


@contextlib.contextmanager
def tuning(**knobs):
    """Temporarily build kernels with other compile-time knobs, e.g. ``tuning(k_stages=3, heavy_first=True)``."""
    unknown = set(knobs) - set(TUNING_KNOBS)
    if unknown:
        raise ValueError(f"tuning: unknown knobs {sorted(unknown)}; expected some of {', '.join(TUNING_KNOBS)}")
    old = dict(_TUNING)
    _TUNING.update(knobs)
    try:
        yield
    finally:
        _TUNING.clear()
        _TUNING.update(old)


def key_for(dtype: str, head_dim: int, causal: bool) -> VariantKey:
    return VariantKey(dtype, head_dim, bool(causal), **_TUNING)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message names the variant and carries the log."""


@dataclass
class Kernel:
    fn: object
    threads: int
    smem: int


@dataclass
class Module:
    key: VariantKey
    fwd: Kernel
    block_max: Kernel


def _read_int(module, symbol: str) -> int:
    cp = cupy()
    ptr = module.get_global(symbol)
    return int(cp.ndarray((1,), cp.int32, ptr).get()[0])


def _kernel(module, fn_name: str, threads_sym: str, smem_sym: str) -> Kernel:
    fn = module.get_function(fn_name)
    k = Kernel(fn, _read_int(module, threads_sym), _read_int(module, smem_sym))
    if k.smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = k.smem
    return k


@functools.cache
def get_module(key: VariantKey, device_id: int) -> Module:
    """Compile (first use) and load one variant on one device."""
    cp = cupy()
    with cp.cuda.Device(device_id):
        raw = cp.RawModule(code=kernel_source(SOURCE), options=key.options(), backend="nvrtc")
        try:
            fwd = _kernel(raw, "bsfa_fwd", "BSFA_FWD_THREADS", "BSFA_FWD_SMEM_BYTES")
            bmax = _kernel(raw, "bsfa_block_max", "BSFA_BLOCK_MAX_THREADS", "BSFA_BLOCK_MAX_SMEM_BYTES")
        except cp.cuda.compiler.CompileException as exc:
            raise KernelCompileError(f"bsfa_cupy: compiling {key.name()} {key.options()} failed:\n{exc}") from exc
    return Module(key, fwd, bmax)


def i32(x) -> np.int32:
    return np.int32(x)


def i64(x) -> np.int64:
    return np.int64(x)
