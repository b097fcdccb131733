"""The one compile path: NVRTC, through CuPy's bindings, into the verified on-disk cache.

CuPy's ``RawModule(code=...)`` only ever targets the plain ``sm_XY`` architectures, which have no
wgmma; so both kernel families are compiled here, by the same NVRTC, to a cubin for the exact
target (``sm_90a`` for the wgmma kernels) and cached by a digest of everything that determines
the binary: the folded source, the options and the NVRTC version.
"""
from __future__ import annotations

from ._cache import cache_dir, get_or_build, key_digest

#: Bump when the cache entry format or the meaning of its key changes.
_CACHE_EPOCH = 1


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message names the variant and carries the log."""


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise KernelCompileError(
            "bsfa_cupy compiles its kernels with NVRTC through CuPy's bindings "
            "(cupy_backends.cuda.libs.nvrtc), which this CuPy does not provide; install CuPy >= 14 "
            "from the bsfa-cupy[cuda12] or [cuda13] extra"
        ) from exc
    return nvrtc


def target(arch: str, compute_capability: str, nvrtc=None) -> tuple[str, bool]:
    """(NVRTC -arch value, whether it yields a cubin) for a kernel family on a device.

    The wgmma family needs the architecture-specific ``sm_90a``. The mma.sync family is built for
    the device's own ``sm_XY``; a device newer than this NVRTC knows gets PTX for the newest
    architecture NVRTC has, which the driver compiles at load.
    """
    if arch in ("sm90", "sm90ws"):
        return "sm_90a", True
    cc = int(compute_capability)
    supported = tuple(int(a) for a in (nvrtc or _nvrtc()).getSupportedArchs())
    if cc in supported:
        return f"sm_{cc}", True
    older = [a for a in supported if a <= cc]
    if not older:
        raise KernelCompileError(f"this NVRTC supports architectures {supported}, none usable for compute capability {cc}")
    return f"compute_{max(older)}", False


def options_for(arch: str, arch_flag: str) -> tuple[str, ...]:
    """NVRTC options besides the key's and the backend's defines."""
    base = ("-std=c++17", f"-arch={arch_flag}", "-lineinfo")
    # The wgmma kernels were measured with flush-to-zero; the mma.sync kernel without.
    return base + (("-ftz=true",) if arch in ("sm90", "sm90ws") else ())


def compile_module(source: str, name: str, options: tuple[str, ...], cubin: bool) -> bytes:
    """NVRTC-compile ``source``; returns a cubin, or null-terminated PTX when ``cubin`` is False."""
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, name + ".cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(f"bsfa_cupy: compiling {name} {' '.join(options)} failed:\n{log}") from exc
        if cubin:
            return bytes(nvrtc.getCUBIN(prog))
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.encode() if isinstance(ptx, str) else bytes(ptx)
        return ptx if ptx.endswith(b"\0") else ptx + b"\0"
    finally:
        nvrtc.destroyProgram(prog)


def cached_binary(source: str, name: str, options: tuple[str, ...], cubin: bool) -> bytes:
    """The compiled module for (source, options), from the cache or freshly compiled and stored."""
    nvrtc = _nvrtc()
    digest = key_digest(_CACHE_EPOCH, source, options, cubin, tuple(nvrtc.getVersion()))
    payload, _ = get_or_build(cache_dir(), name, digest, lambda: compile_module(source, name, options, cubin))
    return payload
