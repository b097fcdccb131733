"""The on-disk cache of compiled kernel modules: atomic writes, verified reads.

Every entry is ``MAGIC | sha256(payload) | key digest | payload``. A reader checks the magic,
the key digest it asked for and the payload's hash; a truncated, corrupt or foreign entry is
treated as a miss and rebuilt, never handed to the driver. Writers put the entry in a temp file
unique to their process and thread, fsync it and ``os.replace`` it into place, so a reader sees
either no file or a whole one. Threads of one process building the same key wait for the first
(one lock per key); several processes may build the same key at once, harmlessly: the last
rename wins and every copy is identical.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

MAGIC = b"BSFA-CUBIN-1\n"
_HASH = 32  # sha256 digest bytes
_KEY = 32  # key digest bytes (hex sha256 truncated to 64 hex characters)

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def cache_dir() -> Path:
    """``$BSFA_CACHE_DIR`` or ``~/.cache/bsfa-cupy``."""
    return Path(os.environ.get("BSFA_CACHE_DIR") or Path.home() / ".cache" / "bsfa-cupy")


def key_digest(*parts) -> str:
    """A stable 64-hex-character digest of everything that determines a compiled module."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def entry_path(directory: Path, stem: str, digest: str) -> Path:
    return Path(directory) / f"{stem}-{digest[:32]}.cubin"


def read_entry(path: Path, digest: str) -> bytes | None:
    """The payload stored for ``digest`` at ``path``, or None when absent or not a valid entry."""
    try:
        blob = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    head = len(MAGIC)
    if len(blob) <= head + _HASH + _KEY or not blob.startswith(MAGIC):
        return None
    stored_hash = blob[head : head + _HASH]
    stored_key = blob[head + _HASH : head + _HASH + _KEY]
    payload = blob[head + _HASH + _KEY :]
    if stored_key != bytes.fromhex(digest)[:_KEY] or hashlib.sha256(payload).digest() != stored_hash:
        return None
    return payload


def write_entry(path: Path, digest: str, payload: bytes) -> None:
    """Atomically store ``payload`` for ``digest`` at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = MAGIC + hashlib.sha256(payload).digest() + bytes.fromhex(digest)[:_KEY] + payload
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def get_or_build(directory: Path, stem: str, digest: str, build: Callable[[], bytes]) -> tuple[bytes, Path]:
    """The cached payload for ``digest``, building and storing it on a miss; returns it and its path.

    A cache that cannot be written (read-only home, full disk) costs a rebuild per process, not
    an error.
    """
    path = entry_path(directory, stem, digest)
    with _lock_for(str(path), digest):
        payload = read_entry(path, digest)
        if payload is not None:
            return payload, path
        payload = build()
        try:
            write_entry(path, digest, payload)
        except OSError:
            pass
        return payload, path


def _lock_for(path: str, digest: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((path, digest), threading.Lock())
