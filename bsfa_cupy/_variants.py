"""Which compiled variant a call runs: the specialisation key and the backend choice.

A key names semantics and target only: dtype, head dim, causal, and the kernel architecture
(``sm80``: the mma.sync kernels of ``bsfa_fwd_sm80.cu``, any GPU of compute capability >= 8.0;
``sm90``: the one-warpgroup wgmma kernels of ``bsfa_fwd_sm90.cu``; ``sm90ws``: the warp-specialised
TMA/wgmma forward of ``bsfa_fwd_sm90ws.cu``; both compute capability 9.0 only; ``splitkv``: the
split-KV mma.sync forward of ``bsfa_fwd_splitkv.cu`` for few query rows against long K/V, any GPU
of compute capability >= 8.0, which ``attention`` routes short queries to, see ``bsfa_cupy/_splitkv.py``). Everything
else compiled into a module (extra defines for an A/B experiment) comes from an explicit
:class:`Backend` argument, never from process state.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Mapping

DTYPES = {"float16": 0, "bfloat16": 1}
SOURCES = {"sm80": "bsfa_fwd_sm80.cu", "sm90": "bsfa_fwd_sm90.cu", "sm90ws": "bsfa_fwd_sm90ws.cu",
           "splitkv": "bsfa_fwd_splitkv.cu"}
ARCH_HEAD_DIMS = {"sm80": (32, 64, 96, 128), "sm90": (64, 128), "sm90ws": (64, 128), "splitkv": (64, 128)}
#: The split-KV family (few query rows, long K/V: bsfa_fwd_splitkv.cu): attention() only, any GPU from sm_80.
SPLITKV_ARCH = "splitkv"
#: Kernel families that need compute capability 9.0 (wgmma, sm_90a).
HOPPER_ARCHS = ("sm90", "sm90ws")
#: Head dims some kernel serves.
HEAD_DIMS = ARCH_HEAD_DIMS["sm80"]
#: Macros a key sets; a Backend's defines may not override them.
_KEY_MACROS = ("BSFA_DTYPE", "BSFA_HEAD_DIM", "BSFA_CAUSAL")
_MACRO = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VALUE = re.compile(r"-?[A-Za-z0-9_.]+\Z")


@dataclass(frozen=True)
class VariantKey:
    """Everything compile-time about one kernel module."""

    dtype: str  # "float16" | "bfloat16"
    head_dim: int
    causal: bool
    arch: str  # "sm80" | "sm90" | "sm90ws" | "splitkv"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.arch not in SOURCES:
            raise ValueError(f"arch: expected one of {tuple(SOURCES)}, got {self.arch!r}")
        if self.head_dim not in ARCH_HEAD_DIMS[self.arch]:
            raise ValueError(f"head_dim: the {self.arch} kernel takes {ARCH_HEAD_DIMS[self.arch]}, got {self.head_dim}")

    @property
    def source(self) -> str:
        return SOURCES[self.arch]

    def defines(self) -> tuple[str, ...]:
        return (
            f"-DBSFA_DTYPE={DTYPES[self.dtype]}",
            f"-DBSFA_HEAD_DIM={self.head_dim}",
            f"-DBSFA_CAUSAL={int(self.causal)}",
        )

    def name(self) -> str:
        return f"bsfa_{self.arch}_{self.dtype}_d{self.head_dim}_{'causal' if self.causal else 'full'}"


@dataclass(frozen=True)
class Backend:
    """An explicit kernel choice: ``arch`` ("auto", "sm80", "sm90", "sm90ws" or "splitkv") and extra preprocessor defines.

    ``defines`` are for benchmarks that compare variants of a kernel (``{"BSFA_SOME_MACRO": 1}``);
    each distinct set compiles and caches its own module. The library itself always runs the
    sources' defaults.
    """

    arch: str = "auto"
    defines: tuple[tuple[str, str], ...] = ()

    def __init__(self, arch: str = "auto", defines: Mapping[str, object] | tuple = ()):
        if arch not in ("auto", *SOURCES):
            raise ValueError(f"backend: expected 'auto', 'sm80', 'sm90', 'sm90ws' or 'splitkv', got {arch!r}")
        items = defines.items() if isinstance(defines, Mapping) else defines
        norm = []
        for name, value in items:
            value = str(int(value)) if isinstance(value, bool) else str(value)
            if not isinstance(name, str) or not _MACRO.match(name) or name in _KEY_MACROS:
                raise ValueError(f"backend defines: expected macro names other than {_KEY_MACROS}, got {name!r}")
            if not _VALUE.match(value):
                raise ValueError(f"backend defines: {name}: expected a number or identifier, got {value!r}")
            norm.append((name, value))
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "defines", tuple(sorted(norm)))

    def options(self) -> tuple[str, ...]:
        return tuple(f"-D{name}={value}" for name, value in self.defines)


def as_backend(backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        return _named_backend(backend)
    raise TypeError(
        f"backend: expected 'auto', 'sm80', 'sm90', 'sm90ws', 'splitkv' or a bsfa_cupy.Backend, got "
        f"{type(backend).__name__}"
    )


@functools.lru_cache(maxsize=None)  # a handful of names; spares every call Backend's checks
def _named_backend(arch: str) -> Backend:
    return Backend(arch)


def select(backend: Backend, dtype: str, head_dim: int, causal: bool, compute_capability: str,
           tma: bool = True) -> VariantKey:
    """The key a call runs.

    ``auto`` on compute capability 9.0, for the head dims it has: the warp-specialised sm90ws where
    its tensor maps can be made (``tma``: NVIDIA's cuda-bindings imports), else the one-warpgroup
    sm90; the mma.sync sm80 everywhere else.
    """
    cc = str(compute_capability)
    if int(cc) < 80:
        raise ValueError(f"bsfa_cupy needs a GPU of compute capability >= 8.0, got {cc[:-1]}.{cc[-1]}")
    arch = backend.arch
    if arch == "auto":
        if cc == "90" and head_dim in ARCH_HEAD_DIMS["sm90ws"] and tma:
            arch = "sm90ws"
        else:
            arch = "sm90" if cc == "90" and head_dim in ARCH_HEAD_DIMS["sm90"] else "sm80"
    elif arch in HOPPER_ARCHS and cc != "90":
        raise ValueError(f"backend {arch!r}: the wgmma kernel needs compute capability 9.0 (Hopper), got {cc[:-1]}.{cc[-1]}")
    if head_dim not in ARCH_HEAD_DIMS[arch]:
        raise ValueError(f"backend {arch!r}: expected head_dim in {ARCH_HEAD_DIMS[arch]}, got {head_dim}")
    return VariantKey(dtype, head_dim, bool(causal), arch)


def all_variants() -> list[VariantKey]:
    return [
        VariantKey(dt, d, c, arch)
        for arch, dims in ARCH_HEAD_DIMS.items()
        for dt in DTYPES
        for d in dims
        for c in (False, True)
    ]
