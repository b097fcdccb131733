"""A whole model's calibrated thresholds: one (Hq, T) table per (k, layer), saved as ``.npz``."""
from __future__ import annotations

import datetime as _dt
import json
import numbers
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from bsfa_reference._validate import check_flag
from bsfa_reference.calibration import check_k_values

from bsfa_reference.tiles import BLOCK_M, BLOCK_N

#: bumped when the .npz layout changes incompatibly
FORMAT_VERSION = 1
_KEYS = ("format_version", "thresholds", "k_values", "block_m", "block_n", "causal", "provenance")
_OFFICIAL_KEYS = ("thresholds", "k_values", "q_block_size", "k_block_size", "max_num_blocks", "num_layers",
                  "num_heads")
#: what np.load and reading an archive member raise for a damaged file (found by truncating and
#: flipping bytes of saved files; RuntimeError: an "encrypted" flag, NotImplementedError: an unknown
#: compression method, MemoryError / OverflowError: a damaged .npy header claiming a huge array)
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, OverflowError, MemoryError, RuntimeError,
                NotImplementedError, zipfile.BadZipFile, zlib.error, struct.error)


class Thresholds:
    """Calibrated BSFA thresholds of a model: ``values[k index, layer, head, position]``.

    values: (len(k_values), layers, Hq, T) real floats (stored as float32), -inf where every tile
        is kept; NaN, complex, integer and object arrays are refused.
    k_values: the k of each first index (off-diagonal key tiles kept per query tile in calibration).
    block_m, block_n: the tile geometry the thresholds were calibrated with (the kernel's 128x64).
    causal: (a bool) whether they were calibrated with the causal mask.
    provenance: str -> str (e.g. source, date, samples, reduce); numbers are stored as text.

    :meth:`for_layer` gives the (Hq, T) float32 array that :func:`bsfa_cupy.attention` takes.
    """

    def __init__(self, values, k_values, *, block_m=BLOCK_M, block_n=BLOCK_N, causal=True, provenance=None):
        self.k_values = check_k_values(k_values)
        arr = np.asarray(values)
        if not _is_real_float(arr.dtype):
            raise TypeError(f"values: expected a float array, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[0] != len(self.k_values) or min(arr.shape) < 1:
            raise ValueError(
                f"values: expected shape ({len(self.k_values)}, layers, Hq, T) for k_values {list(self.k_values)}, "
                f"got {arr.shape}"
            )
        if np.isnan(arr).any():
            raise ValueError(f"values: {int(np.isnan(arr).sum())} NaN values; use -inf to keep every tile")
        self.values = arr
        self.block_m, self.block_n = _positive_int(block_m, "block_m"), _positive_int(block_n, "block_n")
        self.causal = check_flag(causal, "causal")
        self.provenance = _check_provenance(provenance)

    @property
    def num_layers(self) -> int:
        return self.values.shape[1]

    @property
    def num_heads(self) -> int:
        return self.values.shape[2]

    @property
    def num_positions(self) -> int:
        """T: query-tile positions; attention clamps later positions to T - 1."""
        return self.values.shape[3]

    def __repr__(self) -> str:
        return (f"Thresholds(k_values={list(self.k_values)}, layers={self.num_layers}, heads={self.num_heads}, "
                f"T={self.num_positions}, tiles={self.block_m}x{self.block_n}, causal={self.causal})")

    def for_layer(self, layer: int, k: int) -> np.ndarray:
        """(Hq, T) float32 thresholds of ``layer`` for the k VALUE ``k`` (not an index into k_values)."""
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__} {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k: expected an int k value, got {type(k).__name__} {k!r}")
        if k not in self.k_values:
            raise ValueError(f"k: {k} was not calibrated; expected one of the k values {list(self.k_values)}")
        return self.values[self.k_values.index(k), layer].copy()

    def for_decode(self) -> Thresholds:
        """The kernel's (128-row) table for decode steps, from row-calibrated thresholds (``block_m=1``).

        Thresholds calibrated on 128-row tiles must not be used at decode: a decode tile's maximum
        runs over its one row and falls below them, so most tiles are skipped (on SmolLM2-135M at 1K
        tokens, k = 12 skips 5.5 % at prefill and 79 % at decode, +132 % perplexity).
        Calibrated on each row's own tile maxima instead (``bsfa_cupy.hf.calibrate(..., block_m=1)``
        or ``Calibrator(..., block_m=1)`` on the CPU), they keep about k tiles per decode row. The
        kernel looks a call's threshold up at position (q_start + 128 a) // 128; position j here takes
        the row-calibrated value of row 128 j + 127 (the tile's last row, clamped to the last
        calibrated one), so a decode row at position P uses that of the last row of its tile.
        """
        if self.block_m != 1:
            raise ValueError(
                f"for_decode: expected row-calibrated thresholds (block_m=1), got block_m={self.block_m}; "
                "calibrate with block_m=1"
            )
        T = self.num_positions
        rows = np.minimum(np.arange(-(-T // BLOCK_M)) * BLOCK_M + BLOCK_M - 1, T - 1)
        prov = {**self.provenance, "for_decode": f"rows 128j+127 of {T} row-calibrated positions"}
        return Thresholds(self.values[..., rows], self.k_values, block_m=BLOCK_M, block_n=self.block_n,
                          causal=self.causal, provenance=prov)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_calibrators(cls, calibrators, provenance=None) -> Thresholds:
        """One layer per Calibrator (``bsfa_reference.Calibrator`` or ``bsfa_cupy.Calibrator``), in order.

        All must share k_values, tile geometry, causal, softmax_scale and Hq. Layers that saw shorter samples have
        a smaller T; they are padded by repeating their last column, which is what attention does
        for positions >= T (it clamps them to T - 1), so nothing changes for any sequence length.
        ``provenance`` entries override the defaults (source, date, samples, reduce).
        """
        cals = list(calibrators)
        if not cals:
            raise ValueError("calibrators: expected at least one Calibrator (one per layer), got none")
        first = cals[0]
        key = lambda c: (c.k_values, c.block_m, c.block_n, c.causal, c.softmax_scale)  # noqa: E731
        tables = []
        for i, cal in enumerate(cals):
            if key(cal) != key(first):
                raise ValueError(
                    f"calibrators[{i}]: expected (k_values, block_m, block_n, causal, softmax_scale) = {key(first)} "
                    f"as layer 0, got {key(cal)}"
                )
            t = cal.thresholds()  # (K, Hq, T); raises when the calibrator saw no sample
            if tables and t.shape[1] != tables[0].shape[1]:
                raise ValueError(f"calibrators[{i}]: expected {tables[0].shape[1]} query heads as layer 0, got {t.shape[1]}")
            tables.append(t)
        T = max(t.shape[2] for t in tables)
        values = np.stack([np.pad(t, ((0, 0), (0, 0), (0, T - t.shape[2])), mode="edge") for t in tables], axis=1)
        samples = sorted({c.num_samples for c in cals})
        prov = {
            "source": "bsfa_cupy calibration",
            "date": _dt.date.today().isoformat(),
            "samples": str(samples[0]) if len(samples) == 1 else ",".join(map(str, samples)),
            "reduce": first.reduce,
        }
        if first.softmax_scale is not None:  # attention must then be called with the same scale
            prov["softmax_scale"] = repr(float(first.softmax_scale))
        prov.update(_check_provenance(provenance))
        return cls(values, first.k_values, block_m=first.block_m, block_n=first.block_n, causal=first.causal,
                   provenance=prov)

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """Write an ``.npz`` (plain arrays, no pickle; provenance as JSON text) to exactly ``path``.

        The file is replaced atomically: written in full to a temporary file next to it, synced,
        then renamed over ``path``, so a failed write leaves the previous file as it was.
        """
        path = Path(path)
        # pid and thread: concurrent writers of one path never share a temporary file
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
                np.savez(
                    f,
                    format_version=np.int64(FORMAT_VERSION),
                    thresholds=self.values,
                    k_values=np.asarray(self.k_values, dtype=np.int64),
                    block_m=np.int64(self.block_m),
                    block_n=np.int64(self.block_n),
                    causal=np.bool_(self.causal),
                    provenance=np.str_(json.dumps(self.provenance, sort_keys=True)),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        _sync_folder(path.parent)
        return path

    @classmethod
    def load(cls, path, *, check_geometry=True) -> Thresholds:
        """Read a file written by :meth:`save`.

        The tile geometry must be the kernel's 128x64: thresholds calibrated on other tiles are
        maxima over other sets of scores and do not transfer (ValueError). ``check_geometry=False``
        loads such a file for inspection only.

        A missing file is a FileNotFoundError; any other file that cannot be read or is not what
        :meth:`save` writes (truncated, corrupt, missing or mistyped fields) is a ValueError whose
        message starts with the path.
        """
        name = os.fspath(path)
        try:
            data = np.load(name, allow_pickle=False)
        except FileNotFoundError:
            raise
        except _READ_ERRORS as exc:  # not a zip or .npy, truncated, damaged, a pickle, a folder
            raise ValueError(f"{name}: not a readable .npz file (truncated or corrupt): {_reason(exc)}") from None
        if not hasattr(data, "files"):
            raise ValueError(f"{name}: expected an .npz archive of Thresholds.save, got a single .npy array")
        with data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise ValueError(f"{name}: not a bsfa thresholds file: missing {missing} (has {sorted(data.files)}); "
                                 "files of the paper's code load with Thresholds.load_official")
            fields = {}
            for key in _KEYS:
                try:
                    fields[key] = data[key]
                except _READ_ERRORS as exc:  # a damaged member, or an object array (needs pickle)
                    raise ValueError(f"{name}: field {key!r} could not be read ({_reason(exc)}); expected the "
                                     "plain .npy data Thresholds.save writes (truncated or corrupt file?)") from None
        version = _int_field(fields, "format_version", name)
        if version != FORMAT_VERSION:
            raise ValueError(f"{name}: expected format_version {FORMAT_VERSION}, got {version}; "
                             "written by another bsfa-cupy version")
        values = _field(fields, "thresholds", name, "a 4-d float array",
                        lambda a: _is_real_float(a.dtype) and a.ndim == 4)
        k_values = _field(fields, "k_values", name, "a 1-d integer array",
                          lambda a: a.dtype.kind in "iu" and a.ndim == 1).tolist()
        block_m, block_n = _int_field(fields, "block_m", name), _int_field(fields, "block_n", name)
        causal = bool(_field(fields, "causal", name, "a 0-d bool array", lambda a: a.dtype == np.bool_ and a.ndim == 0))
        text = str(_field(fields, "provenance", name, "a 0-d str array", lambda a: a.dtype.kind == "U" and a.ndim == 0))
        try:
            provenance = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: provenance is not JSON text ({exc})") from None
        if check_geometry:
            _check_geometry(block_m, block_n, name)
        try:
            return cls(values, k_values, block_m=block_m, block_n=block_n, causal=causal, provenance=provenance)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: {exc}") from None

    @classmethod
    def load_official(cls, path, *, check_geometry=True) -> Thresholds:
        """Read a threshold file published with the paper's code (a ``torch.save``d dict).

        The dict holds 'thresholds' float32 [num_k, layers, heads, T], 'k_values', 'q_block_size',
        'k_block_size', 'max_num_blocks', 'num_layers', 'num_heads' (and optionally
        'aggregation_method', 'shape_description', kept in ``provenance``). It is read with
        ``torch.load(weights_only=True)``: tensors, numbers, strings and lists only, no code.
        torch is imported here, not before.

        Differences from this package's own calibration and kernel, to keep in mind:

        * Their kernel lets the zero-padded query rows of a partial last query tile into the tile
          maximum (a score of 0 can pass a negative threshold); our maxima cover valid entries
          only. Their calibration script pads partial tiles by repeating the last token and keeps
          the maxima in the model's dtype (fp16) before taking midpoints; ours are float32/float64.
        * Their kernel always keeps FlashAttention's 2-3 causal "masking" key tiles per query tile
          (the last key tile when non-causal); ours always keeps exactly the key tiles overlapping
          the query tile's diagonal span. The calibration rule treats the diagonal alike.
        * They index the threshold by the local query-tile index a; ours by the absolute position
          p(a) = (128a + Nk - Nq) // 128. The two agree when Nq = Nk (plain prefill), not for a
          chunk of queries after a prefix.
        * Their calibration script's default k_block_size is 128 while their kernel uses 64 keys:
          files made with that default carry 128x128 tiles and fail the geometry check here
          (``check_geometry=False`` loads them for inspection only).
        """
        try:
            import torch
        except ImportError:
            raise ImportError("Thresholds.load_official reads torch.save files and needs torch: pip install torch") from None
        name = os.fspath(path)
        try:
            data = torch.load(name, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # torch raises UnpicklingError / RuntimeError for unsafe or broken files
            raise ValueError(
                f"{name}: torch.load(weights_only=True) could not read it as a dict of tensors, numbers and "
                f"strings ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the published "
                "threshold files are such dicts"
            ) from None
        return cls.from_official(data, check_geometry=check_geometry, name=name)

    @classmethod
    def from_official(cls, data: dict, *, check_geometry=True, name="official thresholds") -> Thresholds:
        """The dict of :meth:`load_official`, already loaded (e.g. with ``torch.load``)."""
        if not isinstance(data, dict):
            raise TypeError(f"{name}: expected a dict of the published threshold format, got {type(data).__name__}")
        missing = [k for k in _OFFICIAL_KEYS if k not in data]
        if missing:
            raise ValueError(f"{name}: missing keys {missing} of the published threshold format (has {sorted(data)})")
        thr = data["thresholds"]
        if hasattr(thr, "detach"):  # a torch tensor
            if not thr.is_floating_point():
                raise ValueError(f"{name}: 'thresholds': expected a real float tensor, got {thr.dtype}")
            values = thr.detach().cpu().float().numpy()
        else:
            values = np.asarray(thr)
            if not _is_real_float(values.dtype):
                raise ValueError(f"{name}: 'thresholds': expected a real float array, got dtype {values.dtype}")
            values = values.astype(np.float32)
        ks = data["k_values"]
        ks = ks.tolist() if hasattr(ks, "tolist") else ks
        if not isinstance(ks, (list, tuple)):
            raise ValueError(f"{name}: 'k_values': expected a list of ints, got {type(ks).__name__} {ks!r}")
        k_values = [_official_int(k, "k_values", name) for k in ks]
        sizes = {key: _official_int(data[key], key, name)
                 for key in ("num_layers", "num_heads", "max_num_blocks", "q_block_size", "k_block_size")}
        expect = (len(k_values), sizes["num_layers"], sizes["num_heads"], sizes["max_num_blocks"])
        if values.shape != expect:
            raise ValueError(f"{name}: expected thresholds of shape {expect} (num_k, num_layers, num_heads, "
                             f"max_num_blocks), got {values.shape}")
        block_m, block_n = sizes["q_block_size"], sizes["k_block_size"]
        if check_geometry:
            _check_geometry(block_m, block_n, name)
        prov = {"source": f"official BSFA threshold file {Path(name).name}", "format": "torch dict (arXiv 2512.07011 code)"}
        for key in ("aggregation_method", "shape_description"):
            if isinstance(data.get(key), str):
                prov[key] = data[key]
        try:
            return cls(values, k_values, block_m=block_m, block_n=block_n, causal=True, provenance=prov)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: {exc}") from None


def _is_real_float(dtype) -> bool:
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"dtype {value.dtype}, shape {value.shape}"
    return type(value).__name__  # a member that is not .npy data comes back as bytes


def _field(fields, key, name, expected, ok):
    value = fields[key]
    if not (isinstance(value, np.ndarray) and ok(value)):
        raise ValueError(f"{name}: field {key!r}: expected {expected}, got {_describe(value)}")
    return value


def _int_field(fields, key, name) -> int:
    # kind "iu" leaves out bool and float: 128.9 must not load as 128, nor True as 1
    return int(_field(fields, key, name, "a 0-d integer array", lambda a: a.dtype.kind in "iu" and a.ndim == 0))


def _official_int(value, key, name) -> int:
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: {key!r}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); best effort where folders cannot be synced."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_geometry(block_m: int, block_n: int, name: str) -> None:
    if (block_m, block_n) != (BLOCK_M, BLOCK_N):
        raise ValueError(
            f"{name}: calibrated on {block_m}x{block_n} tiles (queries x keys), but the kernel uses "
            f"{BLOCK_M}x{BLOCK_N}; such thresholds do not transfer: recalibrate, or pass check_geometry=False "
            "to inspect the file only"
        )


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def _check_provenance(provenance) -> dict:
    if provenance is None:
        return {}
    if not isinstance(provenance, dict):
        raise TypeError(f"provenance: expected a dict of str -> str, got {type(provenance).__name__}")
    out = {}
    for key, val in provenance.items():
        if not isinstance(key, str):
            raise TypeError(f"provenance: expected str keys, got {type(key).__name__} {key!r}")
        if isinstance(val, bool) or not isinstance(val, (str, numbers.Real)):
            raise TypeError(f"provenance[{key!r}]: expected a str (or a number, stored as text), got {type(val).__name__}")
        out[key] = str(val)
    return out
