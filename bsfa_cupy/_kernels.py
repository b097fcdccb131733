"""Compiled kernel variants: one specialisation key per module, compiled lazily and cached.

What must be compile-time (dtype, head dim, causal, and the tuning knobs: V-load order, K ring depth, ...) is a macro of the key; cheap
choices (threshold mode, keep-mask output) are run-time arguments, so the variant count stays
small. CuPy caches compiled modules on disk keyed by the source string and options, and the
source string already holds every header (see ``_source``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._backend import cupy
from ._source import kernel_source

#: Query rows x keys per tile; the kernel's traits struct holds the same numbers.
BLOCK_M = 128
BLOCK_N = 64
HEAD_DIMS = (32, 64, 96, 128)
DTYPES = {"float16": 0, "bfloat16": 1}
SOURCE = "bsfa_fwd.cu"
#: The Hopper (sm_90a, wgmma) forward and the head dims it is built for; other head dims and other
#: GPUs use the mma.sync kernel of SOURCE.
SOURCE_SM90 = "bsfa_fwd_sm90.cu"
SM90_HEAD_DIMS = (64, 128)


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
    # Both kernels from SOURCE_SM90 (wgmma, compute capability 9.0 only); the knobs above then
    # have no effect.
    sm90: bool = False

    def __post_init__(self):
        if self.k_stages not in (2, 3):
            raise ValueError(f"k_stages must be 2 or 3, got {self.k_stages!r}")
        if self.k_stages == 3 and self.v_speculative:
            raise ValueError("k_stages=3 needs v_speculative=False (pass k_stages=2 with v_speculative=True)")

    def options(self) -> tuple[str, ...]:
        shape = (
            "-std=c++17",
            f"-DBSFA_DTYPE={DTYPES[self.dtype]}",
            f"-DBSFA_HEAD_DIM={self.head_dim}",
            f"-DBSFA_CAUSAL={int(self.causal)}",
        )
        if self.sm90:  # the wgmma kernel has no tuning macros
            return shape
        return shape + (
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
        defaults = VariantKey(self.dtype, self.head_dim, self.causal, sm90=self.sm90)
        tuned = [f"{k}={getattr(self, k)}" for k in TUNING_KNOBS if getattr(self, k) != getattr(defaults, k)]
        return base + ("_sm90" if self.sm90 else "") + (f"[{','.join(tuned)}]" if tuned else "")


def all_variants() -> list[VariantKey]:
    keys = [VariantKey(dt, d, c) for dt in DTYPES for d in HEAD_DIMS for c in (False, True)]
    return keys + [VariantKey(dt, d, c, sm90=True) for dt in DTYPES for d in SM90_HEAD_DIMS for c in (False, True)]


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
    "sm90",
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


def key_for(dtype: str, head_dim: int, causal: bool, device_id: int) -> VariantKey:
    """The variant the API launches: the wgmma kernels where the device and head dim allow it
    (unless ``tuning(sm90=False)``), else the mma.sync ones."""
    knobs = dict(_TUNING)
    want_sm90 = knobs.pop("sm90", True)
    sm90 = bool(want_sm90) and head_dim in SM90_HEAD_DIMS and compute_capability(device_id) == "90"
    return VariantKey(dtype, head_dim, bool(causal), sm90=sm90, **knobs)


@functools.cache
def compute_capability(device_id: int) -> str:
    return str(cupy().cuda.Device(device_id).compute_capability)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message names the variant and carries the log."""


@dataclass
class Kernel:
    fn: object
    threads: int
    smem: int
    # Grid (w, nQ, B*Hq/w) that hands out heads in chunks (the sm_90a forward), else (nQ, Hq, B);
    # kernels_cu/bsfa_tile.cuh decodes both.
    chunked_grid: bool = False

    def grid(self, B: int, Hq: int, nQ: int) -> tuple[int, int, int]:
        if not self.chunked_grid:
            return (nQ, Hq, B)
        bh = B * Hq
        w = next(w for w in (4, 2, 1) if bh % w == 0)
        if bh // w > MAX_GRID_YZ:  # huge batches: wider chunks, so that gridDim.z fits
            w = min(d for d in _divisors(bh) if bh // d <= MAX_GRID_YZ)
        return (w, nQ, bh // w)


#: CUDA's limit on gridDim.y and gridDim.z.
MAX_GRID_YZ = 65535


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in small]


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


def _cache_dir() -> Path:
    return Path(os.environ.get("BSFA_CACHE_DIR") or Path.home() / ".cache" / "bsfa-cupy")


def _load_sm90(key: VariantKey):
    """NVRTC-compile bsfa_fwd_sm90.cu for sm_90a and load it as a RawModule.

    CuPy's own compile path always names the plain ``sm_90`` target, which has no wgmma; so this
    variant is compiled here, through the same NVRTC, and cached on disk as a cubin keyed by the
    source, the options and the NVRTC version.
    """
    cp = cupy()
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise KernelCompileError(
            f"bsfa_cupy: {key.name()} needs CuPy's NVRTC bindings (cupy_backends.cuda.libs.nvrtc), which this CuPy "
            "does not provide; use the mma.sync kernel with bsfa_cupy._kernels.tuning(sm90=False)"
        ) from exc

    source = kernel_source(SOURCE_SM90)
    options = key.options() + ("-arch=sm_90a", "-ftz=true", "-lineinfo")
    digest = hashlib.sha256(repr((source, options, nvrtc.getVersion())).encode()).hexdigest()[:32]
    path = _cache_dir() / f"bsfa_fwd_sm90-{digest}.cubin"  # keys differing only in mma.sync knobs share it
    if not path.is_file():
        prog = nvrtc.createProgram(source, SOURCE_SM90, (), ())
        try:
            try:
                nvrtc.compileProgram(prog, list(options))
            except nvrtc.NVRTCError as exc:
                log = nvrtc.getProgramLog(prog)
                raise KernelCompileError(f"bsfa_cupy: compiling {key.name()} {options} failed:\n{log}") from exc
            cubin = nvrtc.getCUBIN(prog)
        finally:
            nvrtc.destroyProgram(prog)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)  # atomic: concurrent processes never load a partial file
    return cp.RawModule(path=str(path))


@functools.cache
def get_module(key: VariantKey, device_id: int) -> Module:
    """Compile (first use) and load one variant on one device."""
    cp = cupy()
    if key.sm90:
        with cp.cuda.Device(device_id):
            raw = _load_sm90(key)
            fwd = _kernel(raw, "bsfa_fwd", "BSFA_FWD_THREADS", "BSFA_FWD_SMEM_BYTES")
            bmax = _kernel(raw, "bsfa_block_max", "BSFA_BLOCK_MAX_THREADS", "BSFA_BLOCK_MAX_SMEM_BYTES")
        fwd.chunked_grid = bmax.chunked_grid = True
        return Module(key, fwd, bmax)
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
