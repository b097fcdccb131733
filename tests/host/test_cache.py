"""The compiled-module cache: corrupt, truncated or foreign entries are rebuilt, never loaded;
concurrent first use from threads and processes is safe. No GPU or NVRTC needed: the builder is a
stand-in that returns bytes."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from bsfa_cupy import _cache

DIGEST = _cache.key_digest("source", ("-DX=1",), (13, 0))
OTHER = _cache.key_digest("source", ("-DX=2",), (13, 0))
PAYLOAD = bytes(range(256)) * 64


class Builder:
    def __init__(self, payload=PAYLOAD, delay=0.0):
        self.payload, self.delay, self.calls = payload, delay, 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return self.payload


def test_miss_builds_and_stores_then_hit_reads_back(tmp_path):
    build = Builder()
    payload, path = _cache.get_or_build(tmp_path, "mod", DIGEST, build)
    assert payload == PAYLOAD and path.is_file() and build.calls == 1
    again, _ = _cache.get_or_build(tmp_path, "mod", DIGEST, build)
    assert again == PAYLOAD and build.calls == 1, f"expected a cache hit, the builder ran {build.calls} times"


@pytest.mark.parametrize(
    "damage",
    ["zero-byte", "truncated", "flipped payload byte", "raw cubin without header", "foreign key", "directory"],
)
def test_damaged_entries_are_rebuilt_not_loaded(tmp_path, damage):
    path = _cache.entry_path(tmp_path, "mod", DIGEST)
    _cache.write_entry(path, DIGEST, PAYLOAD)
    blob = path.read_bytes()
    if damage == "zero-byte":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flipped payload byte":
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    elif damage == "raw cubin without header":
        path.write_bytes(b"\x7fELF" + PAYLOAD)
    elif damage == "foreign key":  # an entry of another key under this name (a digest-prefix clash)
        _cache.write_entry(path, OTHER, b"other module")
    else:
        path.unlink()
        path.mkdir()
    assert _cache.read_entry(path, DIGEST) is None, f"{damage}: a damaged entry was accepted"
    build = Builder()
    payload, _ = _cache.get_or_build(tmp_path, "mod", DIGEST, build)
    assert payload == PAYLOAD and build.calls == 1, f"{damage}: expected one rebuild, got {build.calls}"
    if damage != "directory":  # a directory in the way cannot be replaced, only bypassed
        assert _cache.read_entry(path, DIGEST) == PAYLOAD, f"{damage}: the rebuilt entry was not stored"


def test_failed_write_leaves_no_temp_and_keeps_the_old_entry(tmp_path, monkeypatch):
    path = _cache.entry_path(tmp_path, "mod", DIGEST)
    _cache.write_entry(path, DIGEST, PAYLOAD)

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        _cache.write_entry(path, DIGEST, b"new")
    assert _cache.read_entry(path, DIGEST) == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "a temp file was left behind"


def test_unwritable_cache_still_returns_the_module(tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "write_entry", lambda *a: (_ for _ in ()).throw(PermissionError("read-only")))
    payload, _ = _cache.get_or_build(tmp_path, "mod", DIGEST, Builder())
    assert payload == PAYLOAD


def test_threads_share_one_build_and_never_see_a_partial_entry(tmp_path):
    build = Builder(delay=0.05)
    results, errors = [], []

    def worker():
        try:
            results.append(_cache.get_or_build(tmp_path, "mod", DIGEST, build)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} threads failed, first: {errors[0]!r}"
    assert len(results) == 16 and all(r == PAYLOAD for r in results), "a thread got a wrong payload"
    assert build.calls == 1, f"expected one build for 16 threads, got {build.calls}"
    assert [p.name for p in tmp_path.iterdir()] == [_cache.entry_path(tmp_path, "mod", DIGEST).name]


def _process_worker(directory, n_reads, queue):
    bad = 0
    for _ in range(n_reads):
        payload, _ = _cache.get_or_build(directory, "mod", DIGEST, lambda: PAYLOAD)
        bad += payload != PAYLOAD
        # Rewrites race with the other processes' reads: each must see a whole entry or none.
        _cache.write_entry(_cache.entry_path(directory, "mod", DIGEST), DIGEST, PAYLOAD)
    queue.put(bad)


def test_processes_writing_and_reading_at_once_see_whole_entries(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(tmp_path, 40, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    bad = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert sum(bad) == 0, f"{sum(bad)} reads returned a wrong payload"
    assert [p.name for p in tmp_path.iterdir()] == [_cache.entry_path(tmp_path, "mod", DIGEST).name]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BSFA_CACHE_DIR", str(tmp_path / "c"))
    assert _cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BSFA_CACHE_DIR")
    assert _cache.cache_dir().parts[-2:] == (".cache", "bsfa-cupy")


class FakeNvrtc:
    @staticmethod
    def getVersion():
        return (13, 0)


def test_compile_path_recompiles_a_corrupt_cubin_and_compiles_once_across_threads(tmp_path, monkeypatch):
    from bsfa_cupy import _compile

    monkeypatch.setenv("BSFA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_compile, "_nvrtc", lambda: FakeNvrtc)
    compiles = []

    def compile_module(source, name, options, cubin):
        compiles.append(name)
        time.sleep(0.02)
        return b"CUBIN:" + source.encode()

    monkeypatch.setattr(_compile, "compile_module", compile_module)
    threads = [threading.Thread(target=_compile.cached_binary, args=("src", "bsfa_x", ("-DA=1",), True))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(compiles) == 1, f"expected one compile for 8 threads, got {len(compiles)}"
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"")  # a zero-byte cubin left by a crash or a full disk
    assert _compile.cached_binary("src", "bsfa_x", ("-DA=1",), True) == b"CUBIN:src"
    assert len(compiles) == 2, "a corrupt cache entry was loaded instead of recompiled"
    assert _compile.cached_binary("src", "bsfa_x", ("-DA=2",), True) == b"CUBIN:src" and len(compiles) == 3


def test_compile_targets_per_kernel_family_and_device():
    from bsfa_cupy._compile import KernelCompileError, options_for, target

    class Nvrtc:
        @staticmethod
        def getSupportedArchs():
            return (75, 80, 86, 90, 100)

    assert target("sm90", "90", Nvrtc) == ("sm_90a", True)  # wgmma needs the architecture-specific target
    assert target("sm80", "90", Nvrtc) == ("sm_90", True)
    assert target("sm80", "86", Nvrtc) == ("sm_86", True)
    assert target("sm80", "120", Nvrtc) == ("compute_100", False)  # newer than NVRTC: PTX, JIT-compiled at load
    with pytest.raises(KernelCompileError, match="none usable for compute capability 70"):
        target("sm80", "70", Nvrtc)
    assert options_for("sm90", "sm_90a")[:2] == ("-std=c++17", "-arch=sm_90a") and "-ftz=true" in options_for("sm90", "sm_90a")
    assert "-ftz=true" not in options_for("sm80", "sm_80")
