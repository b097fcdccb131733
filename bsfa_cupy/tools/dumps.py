"""Calibration from dumps of a model's per-layer post-RoPE queries and keys (``bsfa calibrate``).

FORMAT below is the whole contract; ``bsfa calibrate --help`` prints it.
"""
from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np

import bsfa_reference
from bsfa_reference._validate import check_qk

FORMAT = """\
Dump format: one calibration dump per .npz file (np.savez), or per folder of .npy files (np.save).
A dump holds, for every layer L = 0, 1, ..., the post-RoPE (after rotary embedding) attention inputs
  q_L  queries (B, N, Hq, D) or (N, Hq, D)
  k_L  keys    (B, N, Hkv, D) or (N, Hkv, D)    (Hq a multiple of Hkv: GQA as in FlashAttention)
as .npz entries q_0, k_0, q_1, ... or as files q_0.npy, k_0.npy, ... in the folder. Every batch
element is one calibration sample; N may differ between dumps, Hq/Hkv/D of a layer may not, and
every dump holds the same layers, numbered from 0 without gaps. Other entries are ignored.
dtypes: float16, float32 or float64 as they are. bfloat16, which NumPy lacks, as its raw 16 bits
(uint16, or ml_dtypes.bfloat16 arrays as np.savez writes them) plus an entry dtype = "bfloat16":
  np.savez("sample0.npz", q_0=q0.view(np.uint16), k_0=k0.view(np.uint16), ..., dtype="bfloat16")
  (from torch: t.cpu().view(torch.int16).numpy().view(np.uint16))
A folder whose entries are .npz files or dump folders is expanded in name order.
On the GPU, float32/float64 dumps are rounded to float16 (the kernel reads float16/bfloat16)."""

_ENTRY = re.compile(r"^([qk])_(\d+)$")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


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
        found = sorted(c for c in p.iterdir() if (c.is_file() and c.suffix == ".npz") or _is_npy_dump(c))
        if not found:
            raise DumpError(f"{p}: a folder with no q_0.npy and no .npz files or dump folders in it")
        out += found
    if not out:
        raise DumpError("no calibration dumps given")
    return out


def _is_npy_dump(p: Path) -> bool:
    return p.is_dir() and (p / "q_0.npy").is_file()


class Dump:
    """One dump, opened lazily: ``layers`` from the entry names, arrays read by :meth:`qk`."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self._files = {f.stem: f for f in path.glob("*.npy")}
            names, self._npz = list(self._files), None
        else:
            try:
                self._npz = np.load(path, allow_pickle=False)
            except (OSError, EOFError, ValueError) as exc:
                raise DumpError(f"{path}: not a readable .npz file ({exc})") from None
            if not hasattr(self._npz, "files"):
                raise DumpError(f"{path}: expected an .npz archive of q_<layer>/k_<layer> entries, got a single array")
            names = self._npz.files
        entries = {(m[1], int(m[2])) for m in map(_ENTRY.match, names) if m}
        q_layers = sorted(layer for kind, layer in entries if kind == "q")
        k_layers = sorted(layer for kind, layer in entries if kind == "k")
        if not q_layers:
            raise DumpError(f"{path}: no q_<layer> entries (found {sorted(names)})")
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

    def _read(self, name):
        try:
            if self._npz is not None:
                return self._npz[name]
            return np.load(self._files[name], allow_pickle=False, mmap_mode="r")
        except (OSError, EOFError, ValueError) as exc:
            raise DumpError(f"{self.path}: entry {name}: unreadable ({exc})") from None

    def qk(self, layer: int):
        """(q, k) of ``layer`` as 4-D host arrays in a float dtype (bfloat16 through ml_dtypes)."""
        return self._array(f"q_{layer}"), self._array(f"k_{layer}")

    def _array(self, name):
        x = self._read(name)
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


def _shape_key(path, layer, q, k):
    """(Hq, Hkv, D) of one layer's q/k, with the reference's checks worded for a dump."""
    try:
        _, _, _, Hq, Hkv, D = check_qk(q, k)
    except ValueError as exc:
        raise DumpError(f"{path}: layer {layer}: {exc}") from None
    return Hq, Hkv, D


def calibrate_dumps(paths, k_values, *, reduce="mean", causal=True, softmax_scale=None, use_gpu=False,
                    progress=True, provenance=None):
    """Thresholds for a whole model from dumps (see FORMAT): one Calibrator per layer.

    ``use_gpu`` runs :class:`bsfa_cupy.Calibrator` (CuPy + a GPU), else the float64 reference rule
    with tile maxima computed in bands (:class:`HostCalibrator`).
    Returns (Thresholds, number of dumps).
    """
    from .progress import progress as progress_bar
    from ..thresholds import Thresholds

    paths = find_dumps(paths)
    if use_gpu:
        from ..calibration import Calibrator

        to_device = _to_device
    else:
        Calibrator, to_device = HostCalibrator, None
    first = Dump(paths[0])
    n_layers = len(first.layers)
    first.close()
    cals = [Calibrator(k_values, causal=causal, softmax_scale=softmax_scale, reduce=reduce) for _ in range(n_layers)]
    shapes: dict[int, tuple] = {}
    steps = [(i, layer) for i in range(len(paths)) for layer in range(n_layers)]
    dump = None
    for i, layer in progress_bar(steps, "calibrating (dumps x layers)", progress):
        if layer == 0:
            if dump is not None:
                dump.close()
            dump = Dump(paths[i])
            if len(dump.layers) != n_layers:
                raise DumpError(f"{paths[i]}: expected {n_layers} layers as in {paths[0]}, got {len(dump.layers)}")
        q, k = dump.qk(layer)
        shape = _shape_key(paths[i], layer, q, k)
        if shape[0] != shapes.get(0, shape)[0]:  # one (layers, Hq, T) table per k
            raise DumpError(f"{paths[i]}: layer {layer}: expected {shapes[0][0]} query heads as layer 0, got {shape[0]}")
        want = shapes.setdefault(layer, shape)
        if shape != want:
            raise DumpError(f"{paths[i]}: layer {layer}: expected (Hq, Hkv, D) = {want} as in {paths[0].name}, "
                            f"got {shape}")
        if to_device is not None:
            q, k = to_device(q, f"{paths[i]}: q_{layer}"), to_device(k, f"{paths[i]}: k_{layer}")
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
    """``bsfa_reference.Calibrator`` with its tile maxima taken a band of query tiles at a time.

    The reference materialises (B, Hq, Nq, Nk) float64 scores; a model dump at N = 32K would need
    hundreds of GiB. Each band of query rows is passed as the last queries of a key sequence cut at
    row r1 + Nk - Nq, which gives it exactly the bottom-right causal mask it has in the whole, so
    the maxima equal the reference's; key tiles past the cut have no valid entry (-inf).
    """

    budget = 2**25  # float64 scores per band: 256 MiB

    def _tile_max(self, q, k):
        return banded_block_max(q, k, self.causal, self.softmax_scale, self.block_m, self.block_n, self.budget)


def banded_block_max(q, k, causal, softmax_scale, block_m, block_n, budget):
    """``bsfa_reference.block_max_scores`` computed in bands of query tiles of <= ``budget`` scores."""
    B, Nq, Hq, _ = q.shape
    Nk = k.shape[1]
    nK = -(-Nk // block_n)
    rows = max(1, budget // (B * Hq * Nk * block_m)) * block_m
    bands = []
    for r0 in range(0, Nq, rows):
        r1 = min(r0 + rows, Nq)
        cut = max(r1 + Nk - Nq, 0) if causal else Nk
        if cut == 0:  # every query of the band precedes the key sequence
            bands.append(np.full((B, Hq, -(-(r1 - r0) // block_m), nK), -np.inf))
            continue
        tm = bsfa_reference.block_max_scores(q[:, r0:r1], k[:, :cut], causal=causal, softmax_scale=softmax_scale,
                              block_m=block_m, block_n=block_n)
        bands.append(np.pad(tm, ((0, 0), (0, 0), (0, 0), (0, nK - tm.shape[-1])), constant_values=-np.inf))
    return np.concatenate(bands, axis=2)


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
