"""Whether a sequence length fits in host memory: the float64 NumPy reference path of ``bsfa demo`` /
``bsfa accuracy``, and the host side of the GPU demo.

The reference materialises N x N float64 scores per head, so N = 100K at four heads needs hundreds
of GiB. The estimate is made before any work and compared with the memory this process can get
(and with the reference's own bound), so that a too-large ``--n`` is one line naming the way out
instead of a MemoryError, swapping or the kernel's out-of-memory kill after the calibration.
"""
from __future__ import annotations

import os
from pathlib import Path

_BLOCK = 128  # suggested lengths are whole query tiles


def host_reference_bytes(n: int, hq: int, d: int, hkv: int = 1) -> int:
    """Peak bytes of one (calibrate, dense, block-sparse) round of the reference at B = 1, Nq = Nk = n.

    Per score: two float64 (Hq, N, N) arrays and a bool one are alive at once in
    ``bsfa_reference.attention`` (17.5 bytes per score measured with tracemalloc at N = 4096);
    per input element: the samples in float32/float16, their float64 copies and the outputs.
    """
    return 18 * hq * n * n + 24 * n * d * (hq + 2 * hkv) + 4 * 2**20


def reference_bound() -> int | None:
    """The reference's own refusal bound in bytes, where it has one."""
    try:
        from bsfa_reference._memory import max_bytes
    except ImportError:  # a reference without a bound
        return None
    return int(max_bytes())


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit; None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = int(Path(limit_file).read_text().strip())
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        avail = min(avail, max(limit - usage, 0))
    return avail


def gpu_demo_host_bytes(n: int, hq: int, d: int, hkv: int = 1) -> int:
    """Host bytes of ``bsfa demo`` on the GPU: the float32 samples (built on the host, with a temporary
    per array), their float16 copies, the float32 outputs brought back, and the (Hq, nQ, nK) keep
    mask with two temporaries of its size."""
    tiles = hq * -(-n // 128) * -(-n // 64)
    return 10 * n * d * (hq + 2 * hkv) + 8 * n * hq * d + 3 * tiles + 4 * 2**20


def check_host_memory(n: int, need, option: str = "--n", what: str = "this command") -> None:
    """ValueError when ``need(n)`` host bytes exceed the memory available (checked where known)."""
    avail = available_memory()
    if avail is None or need(n) <= avail:
        return
    fit = _largest_fitting(avail, need)
    hint = f"at most {fit} fits" if fit else "no length fits"
    raise ValueError(f"{option} {n}: {what} needs about {_gib(need(n))} of host memory at this length, more than "
                     f"the {_gib(avail)} available; use a smaller {option} ({hint})")


def check_host_reference(ns, hq: int, d: int, hkv: int = 1, option: str = "--n") -> None:
    """ValueError naming the size and the way out when the largest of ``ns`` cannot run on the CPU."""
    n = max(ns)
    need = host_reference_bytes(n, hq, d, hkv)
    limits = []
    avail = available_memory()
    if avail is not None:
        limits.append((avail, f"the {_gib(avail)} of memory available"))
    bound = reference_bound()
    if bound is not None:
        limits.append((bound, f"the reference's bound of {_gib(bound)} (BSFA_REFERENCE_MAX_BYTES)"))
    if not limits:
        return
    limit, what = min(limits)
    if need <= limit:
        return
    fit = _largest_fitting(limit, lambda m: host_reference_bytes(m, hq, d, hkv))
    hint = f"at most {fit} fits" if fit else "no length fits"
    raise ValueError(f"{option} {n}: the CPU reference path needs about {_gib(need)} at this length ({hq} heads "
                     f"of N x N float64 scores), more than {what}; use a smaller {option} ({hint}) or a GPU "
                     "(--device gpu)")


def _largest_fitting(limit, need) -> int:
    """The largest whole number of query tiles whose ``need`` stays within ``limit`` (0 if none)."""
    lo, hi = 0, 1
    while need(hi * _BLOCK) <= limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid * _BLOCK) <= limit else (lo, mid)
    return lo * _BLOCK


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"
