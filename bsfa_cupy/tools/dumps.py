"""Calibration from dumps of a model's per-layer post-RoPE queries and keys (``bsfa calibrate``).

FORMAT below is the whole contract; ``bsfa calibrate --help`` prints it.
"""
from __future__ import annotations

import math
import numbers
import os
import re
import zipfile
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

import bsfa_reference
from bsfa_reference._validate import SUPPORTED_DTYPES, check_block, check_qk, softmax_scale_or_default

FORMAT = """\
Dump format: one calibration dump per .npz file (np.savez), or per folder of .npy files (np.save).
A dump holds, for every layer L = 0, 1, ..., the post-RoPE (after rotary embedding) attention inputs
  q_L  queries (B, N, Hq, D) or (N, Hq, D)
  k_L  keys    (B, N, Hkv, D) or (N, Hkv, D)    (Hq a multiple of Hkv: GQA as in FlashAttention)
as .npz entries q_0, k_0, q_1, ... or as files q_0.npy, k_0.npy, ... in the folder (zero-padded
numbers such as q_00 are read too). Every batch element is one calibration sample; N may differ
between dumps, Hq/Hkv/D of a layer may not, and every dump holds the same layers, numbered from 0
without gaps. Other entries are ignored. Values must be finite (no NaN or inf).
dtypes: float16, float32 or float64 as they are. bfloat16, which NumPy lacks, as its raw 16 bits
(uint16, or ml_dtypes.bfloat16 arrays as np.savez writes them) plus an entry dtype = "bfloat16":
  np.savez("sample0.npz", q_0=q0.view(np.uint16), k_0=k0.view(np.uint16), ..., dtype="bfloat16")
  (from torch: t.cpu().view(torch.int16).numpy().view(np.uint16))
A folder whose entries are .npz files or dump folders is expanded in name order.
Every dump's entry names and array headers are checked before the calibration starts.
On the GPU, float32/float64 dumps are rounded to float16 (the kernel reads float16/bfloat16)."""

_ENTRY = re.compile(r"^([qk])_(\d+)$")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# What a damaged file raises from zipfile / zlib / np.lib.format, besides OSError and ValueError.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError)


class DumpError(ValueError):
    """A dump that does not follow FORMAT; the message names the file and entry."""


def find_dumps(paths) -> list[Path]:
    """Dump paths (an .npz file or a folder of q_*.npy) from files and folders given by the user."""
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_file() or _is_npy_dump(p):
            out.append(p)
            continue
        if not p.is_dir():
            raise DumpError(f"{p}: not a regular file or folder")
        found = sorted(c for c in p.iterdir() if (c.is_file() and c.suffix == ".npz") or _is_npy_dump(c))
        if not found:
            raise DumpError(f"{p}: a folder with no q_0.npy and no .npz files or dump folders in it")
        out += found
    if not out:
        raise DumpError("no calibration dumps given")
    return out


def dump_files(paths) -> list[Path]:
    """Every file the dumps at ``paths`` (from :func:`find_dumps`) consist of: what no output may overwrite."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.npy")) if p.is_dir() else [p]
    return files


def _is_npy_dump(p: Path) -> bool:
    return p.is_dir() and any(_ENTRY.match(f.stem) for f in p.glob("q_*.npy"))


class Dump:
    """One dump, opened lazily: ``layers`` from the entry names, headers by :meth:`spec`, arrays by :meth:`qk`."""

    def __init__(self, path: Path):
        self.path = path
        self._npz = None
        if path.is_dir():
            self._files = {f.stem: f for f in path.glob("*.npy")}
            names = list(self._files)
        else:
            try:
                self._npz = np.load(path, allow_pickle=False)
            except _READ_ERRORS as exc:
                raise DumpError(f"{path}: not a readable .npz file ({_reason(exc)})") from None
            if not hasattr(self._npz, "files"):
                raise DumpError(f"{path}: expected an .npz archive of q_<layer>/k_<layer> entries, got a single array")
            names = self._npz.files
        self._entries: dict[tuple[str, int], str] = {}
        for name in sorted(names):
            m = _ENTRY.match(name)
            if not m:
                continue
            key = (m[1], int(m[2]))
            if key in self._entries:
                raise DumpError(f"{path}: entries {self._entries[key]} and {name} both name layer {key[1]}'s "
                                f"{'queries' if key[0] == 'q' else 'keys'}; keep one")
            self._entries[key] = name
        q_layers = sorted(layer for kind, layer in self._entries if kind == "q")
        k_layers = sorted(layer for kind, layer in self._entries if kind == "k")
        if not q_layers:
            hint = "; a thresholds file, not a dump?" if "thresholds" in names and "k_values" in names else ""
            raise DumpError(f"{path}: no q_<layer> entries (found {sorted(names)}{hint})")
        if q_layers != k_layers:
            odd = sorted(set(q_layers) ^ set(k_layers))
            raise DumpError(f"{path}: expected q_L and k_L for the same layers, got layers {odd} with only one of them")
        if q_layers != list(range(len(q_layers))):
            raise DumpError(f"{path}: expected layers numbered 0..{len(q_layers) - 1} without gaps, got {q_layers}")
        self.layers = q_layers
        self.bf16 = False
        if "dtype" in names:
            tag = str(self._read("dtype"))
            if tag not in ("bfloat16", *map(str, _FLOATS)):
                raise DumpError(f"{path}: entry dtype: expected 'bfloat16' (or a float dtype name), got {tag!r}")
            self.bf16 = tag == "bfloat16"

    def entry(self, kind: str, layer: int) -> str:
        return self._entries[(kind, layer)]

    def _read(self, name):
        try:
            if self._npz is not None:
                x = self._npz[name]
            else:
                x = np.load(self._files[name], allow_pickle=False, mmap_mode="r")
        except _READ_ERRORS as exc:
            raise DumpError(f"{self.path}: entry {name}: unreadable ({_reason(exc)})") from None
        if not isinstance(x, np.ndarray):  # np.load hands out a zip member not written by np.save as bytes
            raise DumpError(f"{self.path}: entry {name}: not a .npy array (a zip member written by other means)")
        return x

    def spec(self, name):
        """A zero-strided stand-in of the array ``name`` with its shape and dtype, read from its .npy header
        only; also checks that the data the header promises is all there."""
        try:
            if self._npz is not None:
                member = name + ".npy"
                if member not in self._npz.zip.namelist():
                    raise DumpError(f"{self.path}: entry {name}: not a .npy array (a zip member written by other "
                                    "means)")
                size = self._npz.zip.getinfo(member).file_size
                with self._npz.zip.open(member) as f:
                    shape, dtype, offset = _npy_header(f)
            else:
                size = os.stat(self._files[name]).st_size
                with open(self._files[name], "rb") as f:
                    shape, dtype, offset = _npy_header(f)
        except DumpError:
            raise
        except _READ_ERRORS as exc:
            raise DumpError(f"{self.path}: entry {name}: unreadable ({_reason(exc)})") from None
        if dtype.hasobject:
            raise DumpError(f"{self.path}: {name}: an array of Python objects; expected float16/float32/float64 or "
                            "bfloat16 bits")
        need = offset + math.prod(shape) * dtype.itemsize
        if size < need:
            raise DumpError(f"{self.path}: {name}: truncated ({size} bytes, its header promises {need})")
        return self._as_4d(name, np.broadcast_to(np.zeros((), dtype), shape))

    def qk(self, layer: int):
        """(q, k) of ``layer`` as finite 4-D host arrays in a float dtype (bfloat16 through ml_dtypes)."""
        return self._array(self.entry("q", layer)), self._array(self.entry("k", layer))

    def _array(self, name):
        x = self._as_4d(name, self._read(name))
        _check_finite(x, f"{self.path}: {name}")
        return x

    def _as_4d(self, name, x):
        if x.ndim == 3:
            x = x[None]  # (N, H, D): one sample
        if x.ndim != 4:
            raise DumpError(f"{self.path}: {name}: expected shape (B, N, H, D) or (N, H, D), got {x.shape}")
        if x.dtype.itemsize == 2 and x.dtype.kind in "uiV" and self.bf16:
            return x.view(ml_dtypes.bfloat16)
        if x.dtype not in _FLOATS:
            hint = " (bfloat16 bits need an entry dtype = 'bfloat16')" if x.dtype.itemsize == 2 else ""
            raise DumpError(f"{self.path}: {name}: expected float16/float32/float64 or bfloat16 bits, "
                            f"got dtype {x.dtype}{hint}")
        return x

    def close(self):
        if self._npz is not None:
            self._npz.close()


def _npy_header(f):
    """(shape, dtype, data offset) of the .npy stream ``f``, reading the header only."""
    version = np.lib.format.read_magic(f)
    # Version 3 differs from 2 only in the header's text encoding (UTF-8 for field names).
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype, f.tell()


def _reason(exc) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_finite(x, name, chunk=2**22):
    """DumpError on NaN/inf: they make scores NaN or infinite, which the threshold rule would silently
    drop or turn into infinite thresholds. Checked in chunks so the bool mask stays small."""
    rows = max(1, chunk // max(1, x.shape[0] * math.prod(x.shape[2:])))
    for i in range(0, x.shape[1], rows):
        part = x[:, i:i + rows]
        bad = ~np.isfinite(part)
        if bad.any():
            b, j, h, d = np.argwhere(bad)[0]
            raise DumpError(f"{name}: expected finite values, got {part[b, j, h, d]} at [{b}, {i + j}, {h}, {d}]"
                            f"{' (and more)' if bad.sum() > 1 else ''}")


def _shape_key(path, layer, q, k):
    """(Hq, Hkv, D) of one layer's q/k, with the reference's checks worded for a dump."""
    try:
        _, _, _, Hq, Hkv, D = check_qk(q, k)
    except ValueError as exc:
        raise DumpError(f"{path}: layer {layer}: {exc}") from None
    return Hq, Hkv, D


def check_dumps(paths) -> int:
    """Check every dump's entries and array headers (no array data is read) against FORMAT and against
    each other, so a bad dump anywhere is reported before any work; returns the number of layers."""
    paths = [Path(p) for p in paths]
    n_layers = None
    shapes: dict[int, tuple] = {}
    for path in paths:
        dump = Dump(path)
        try:
            if n_layers is None:
                n_layers = len(dump.layers)
            elif len(dump.layers) != n_layers:
                raise DumpError(f"{path}: expected {n_layers} layers as in {paths[0]}, got {len(dump.layers)}")
            for layer in dump.layers:
                q, k = dump.spec(dump.entry("q", layer)), dump.spec(dump.entry("k", layer))
                shape = _shape_key(path, layer, q, k)
                if shape[0] != shapes.get(0, shape)[0]:  # one (layers, Hq, T) table per k
                    raise DumpError(f"{path}: layer {layer}: expected {shapes[0][0]} query heads as layer 0, "
                                    f"got {shape[0]}")
                want = shapes.setdefault(layer, shape)
                if shape != want:
                    raise DumpError(f"{path}: layer {layer}: expected (Hq, Hkv, D) = {want} as in {paths[0].name}, "
                                    f"got {shape}")
        finally:
            dump.close()
    return n_layers


def check_softmax_scale(softmax_scale):
    """None, or a finite real > 0 (a scale <= 0 would reverse or erase the ranking of the tiles)."""
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale: expected a finite number > 0, got {softmax_scale}")
    return float(softmax_scale)


def calibrate_dumps(paths, k_values, *, reduce="mean", causal=True, softmax_scale=None, use_gpu=False,
                    progress=True, provenance=None):
    """Thresholds for a whole model from dumps (see FORMAT): one Calibrator per layer.

    ``use_gpu`` runs :class:`bsfa_cupy.Calibrator` (CuPy + a GPU), else the float64 reference rule
    with tile maxima computed in bands (:class:`HostCalibrator`). Arguments and every dump's
    entries and headers are checked before the first array is read.
    Returns (Thresholds, number of dumps).
    """
    from .progress import progress as progress_bar
    from ..thresholds import Thresholds

    softmax_scale = check_softmax_scale(softmax_scale)
    paths = find_dumps(paths)
    if use_gpu:
        from ..calibration import Calibrator

        to_device = _to_device
    else:
        Calibrator, to_device = HostCalibrator, None
    Calibrator(k_values, causal=causal, softmax_scale=softmax_scale, reduce=reduce)  # argument errors first
    n_layers = check_dumps(paths)
    cals = [Calibrator(k_values, causal=causal, softmax_scale=softmax_scale, reduce=reduce) for _ in range(n_layers)]
    steps = [(i, layer) for i in range(len(paths)) for layer in range(n_layers)]
    dump = None
    for i, layer in progress_bar(steps, "calibrating (dumps x layers)", progress):
        if layer == 0:
            if dump is not None:
                dump.close()
            dump = Dump(paths[i])
        q, k = dump.qk(layer)
        if to_device is not None:
            q = to_device(q, f"{paths[i]}: {dump.entry('q', layer)}")
            k = to_device(k, f"{paths[i]}: {dump.entry('k', layer)}")
        else:
            q, k = np.asarray(q), np.asarray(k)
        cals[layer].update(q, k)
    if dump is not None:
        dump.close()
    names = [p.name for p in paths]
    prov = {"source": "bsfa calibrate", "device": "gpu (bsfa_cupy.Calibrator)" if use_gpu else "cpu (bsfa_reference)",
            "dumps": ", ".join(names[:8]) + (f", ... ({len(names)} dumps)" if len(names) > 8 else "")}
    prov.update(provenance or {})
    return Thresholds.from_calibrators(cals, provenance=prov), len(paths)


class HostCalibrator(bsfa_reference.Calibrator):
    """``bsfa_reference.Calibrator`` with its tile maxima from :func:`banded_block_max`.

    The reference materialises (B, Hq, Nq, Nk) float64 scores, a few score-sized temporaries and a
    GQA copy of k: at Hq = 32 and N = 64K that is several hundred GiB. Here every array a band
    allocates counts against ``budget`` bytes (:func:`band_plan`). Not in the budget: the
    (B, Hq, nQ, nK) float64 maxima themselves (128 MiB at that size) and the reference's
    threshold selection on them, which sorts a copy.
    """

    budget = 256 * 2**20  # bytes a band may allocate

    def _tile_max(self, q, k):
        return banded_block_max(q, k, self.causal, self.softmax_scale, self.block_m, self.block_n, self.budget)


def _band_bytes(G, D, rows, cols):
    """Bytes :func:`banded_block_max` allocates for a band of ``rows`` queries x ``cols`` keys of one kv head
    shared by G query heads: float64 queries (G, rows, D) and keys (cols, D), float64 scores
    (G, rows, cols), the bool causal mask (rows, cols), its int64 row/column indices (and their
    shifted copy), and NumPy's casting buffers (8192 elements, a few of them)."""
    return 8 * G * rows * D + 8 * cols * D + 8 * G * rows * cols + rows * cols + 8 * (2 * rows + cols) + 4 * 8192 * 8


def band_plan(Hq, Hkv, D, Nq, Nk, block_m, block_n, budget):
    """(rows, cols, bytes) of the bands :func:`banded_block_max` takes: whole tiles, keys widened first (a
    query band is then converted once), both at least one tile even when that exceeds ``budget``."""
    G = Hq // Hkv
    rows_max, cols_max = -(-Nq // block_m) * block_m, -(-Nk // block_n) * block_n

    def widest(step, limit, fits):
        lo, hi = 1, limit // step  # in steps; lo is taken even when it does not fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
        return lo * step

    cols = widest(block_n, cols_max, lambda c: _band_bytes(G, D, block_m, c) <= budget)
    rows = block_m
    if cols == cols_max:
        rows = widest(block_m, rows_max, lambda r: _band_bytes(G, D, r, cols) <= budget)
    return rows, cols, _band_bytes(G, D, rows, cols)


def banded_block_max(q, k, causal, softmax_scale, block_m, block_n, budget):
    """``bsfa_reference.block_max_scores`` for finite inputs, a band of queries x keys of one kv head at a
    time, each band allocating at most ``budget`` bytes (see :func:`band_plan`).

    The G query heads of a kv head read its keys directly (no repeated copy of k). Key tiles a
    causal band cannot see are never computed. Padding rows/columns of a partial tile and masked
    entries are -inf before the per-tile maximum, which ignores NaN as the reference's does.
    """
    for x, name in ((q, "q"), (k, "k")):
        if not isinstance(x, np.ndarray) or x.dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected a numpy array of one of {[str(t) for t in SUPPORTED_DTYPES]}, "
                            f"got {type(x).__name__} {getattr(x, 'dtype', '')}")
    B, Nq, Nk, Hq, Hkv, D = check_qk(q, k)
    block_m, block_n = check_block(block_m, "block_m"), check_block(block_n, "block_n")
    scale = softmax_scale_or_default(softmax_scale, D)
    G = Hq // Hkv
    rows, cols, _ = band_plan(Hq, Hkv, D, Nq, Nk, block_m, block_n, budget)
    off = Nk - Nq  # bottom-right aligned causal mask: (i, j) valid iff j <= i + off
    out = np.full((B, Hq, -(-Nq // block_m), -(-Nk // block_n)), -np.inf)
    # Allocated once and reused as views: a fresh score array per band would briefly coexist with the last one.
    qbuf = np.empty((G, rows, D))
    kbuf = np.empty((cols, D))
    sbuf = np.empty((G, rows, cols))
    mbuf = np.empty((rows, cols), dtype=bool)
    for b in range(B):
        for h in range(Hkv):
            heads = slice(h * G, (h + 1) * G)
            for r0 in range(0, Nq, rows):
                nr = min(rows, Nq - r0)
                rp = -(-nr // block_m) * block_m
                last = min(r0 + nr - 1 + off, Nk - 1) if causal else Nk - 1  # the band's last visible key
                if last < 0:
                    continue  # every query of the band precedes the key sequence: no valid entry
                qv = qbuf[:, :rp]
                qv[:, :nr] = q[b, r0:r0 + nr, heads].transpose(1, 0, 2)
                qv[:, nr:] = 0.0
                for c0 in range(0, last + 1, cols):
                    nc = min(cols, last + 1 - c0)
                    cp = -(-nc // block_n) * block_n
                    kv = kbuf[:cp]
                    kv[:nc] = k[b, c0:c0 + nc, h]
                    kv[nc:] = 0.0
                    s = np.matmul(qv, kv.T, out=sbuf[:, :rp, :cp])
                    s *= scale
                    s[:, nr:] = -np.inf
                    s[:, :, nc:] = -np.inf
                    if causal and c0 + nc - 1 > r0 + off:  # the band crosses the diagonal
                        m = mbuf[:rp, :cp]
                        np.greater(np.arange(c0, c0 + cp), (np.arange(r0, r0 + rp) + off)[:, None], out=m)
                        np.copyto(s, -np.inf, where=m)
                    tiles = s.reshape(G, rp // block_m, block_m, cp // block_n, block_n)
                    a0, k0 = r0 // block_m, c0 // block_n
                    np.fmax.reduce(tiles, axis=(2, 4), out=out[b, heads, a0:a0 + rp // block_m, k0:k0 + cp // block_n])
    return out


def _to_device(x, name):
    """Host dump array -> CuPy float16/bfloat16 (the kernel's dtypes)."""
    from .._backend import cupy

    cp = cupy()
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return cp.asarray(np.ascontiguousarray(x).view(np.uint16)).view(x.dtype)  # move raw bits
    if x.dtype != np.float16:
        big = float(np.abs(x).max()) if x.size else 0.0
        if not big <= float(np.finfo(np.float16).max):
            raise DumpError(f"{name}: values up to {big:g} exceed float16's range; save the dump as bfloat16")
        x = x.astype(np.float16)
    return cp.asarray(x)
