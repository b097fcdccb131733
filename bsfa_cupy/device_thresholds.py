"""Thresholds as the kernel takes them, and a GPU copy validated once for repeated calls."""
from __future__ import annotations

import numbers

import numpy as np

from ._arrays import frame_for, framework_of, on, to_cupy
from ._backend import cupy


class DeviceThresholds:
    """(Hq, T) float32 thresholds checked once and held on the GPU as a private copy.

    ``attention`` checks a device thresholds array for NaN on every call, and that check waits for
    the stream. Inside a model's layer loop, build one ``DeviceThresholds`` per layer up front and
    pass it instead: it is validated here (shape, dtype, NaN; the stream is synchronised once) and
    ``attention`` then only checks that its head count and GPU match. The copy is private, so
    later writes to the source array do not reach it; keep the object alive while kernels that use
    it may still run, as with any GPU array.

    thresholds: a host array (any real dtype, cast to float32; copied to ``device``, default the
    current CuPy device) or a float32 CuPy / PyTorch / JAX GPU array (copied on its own device,
    ordered after its producer on the framework's current stream).
    """

    def __init__(self, thresholds, *, device: int | None = None):
        if _is_scalar(thresholds):
            raise TypeError("thresholds: a scalar needs no device copy; pass it to attention() directly")
        cp = cupy()
        if isinstance(thresholds, np.ndarray):
            host = _host_thresholds(thresholds)
            with cp.cuda.Device(device if device is not None else cp.cuda.Device().id) as dev:
                self.array = cp.asarray(host)
                self.device_id = dev.id
                cp.cuda.get_current_stream().synchronize()
        else:
            frame = frame_for(thresholds)
            if device is not None and device != frame.device_id:
                raise ValueError(f"device: the array is on cuda:{frame.device_id}, got device={device}")
            with on(frame) as stream:
                view = _device_view(thresholds)
                self.array = cp.array(view, dtype=cp.float32, order="C", copy=True)
                _check_no_nan(self.array)  # synchronises the stream, so the copy is complete everywhere
                stream.synchronize()
            self.device_id = frame.device_id

    @classmethod
    def _adopt(cls, array, device_id: int) -> "DeviceThresholds":
        """One around a private (Hq, T) float32 array that kernel_thresholds has validated already."""
        obj = cls.__new__(cls)
        obj.array, obj.device_id = array, device_id
        return obj

    @property
    def heads(self) -> int:
        return int(self.array.shape[0])

    @property
    def positions(self) -> int:
        return int(self.array.shape[1])

    def __repr__(self) -> str:
        return f"DeviceThresholds(heads={self.heads}, positions={self.positions}, device=cuda:{self.device_id})"


def kernel_thresholds(thresholds, Hq, device_id):
    """(mode, scalar, device array or None, T) for the kernel; NaN and bad shapes rejected."""
    cp = cupy()
    if thresholds is None:
        return 0, 0.0, None, 1
    if isinstance(thresholds, DeviceThresholds):
        if thresholds.heads != Hq:
            raise ValueError(f"thresholds: expected {Hq} heads (the inputs' Hq), got a DeviceThresholds of "
                             f"{thresholds.heads}")
        if thresholds.device_id != device_id:
            raise ValueError(f"thresholds: expected a DeviceThresholds on cuda:{device_id} (the inputs' GPU), "
                             f"got cuda:{thresholds.device_id}")
        return 2, 0.0, thresholds.array, thresholds.positions
    if _is_scalar(thresholds):
        if isinstance(thresholds, (bool, np.bool_)):
            raise TypeError("thresholds: expected None, a float scalar or an (Hq, T) float32 array, got bool")
        with np.errstate(over="ignore"):  # beyond float32 range compares as +-inf
            t = np.float32(thresholds)
        if np.isnan(t):
            raise ValueError("thresholds: NaN is not a threshold; use -inf to keep every tile")
        return 1, float(t), None, 1
    if isinstance(thresholds, np.ndarray):
        host = _host_thresholds(thresholds, Hq)
        return 2, 0.0, cp.asarray(host), host.shape[1]
    view = _device_view(thresholds, Hq)
    if view.device.id != device_id:
        raise ValueError(f"thresholds: expected an array on cuda:{device_id} (the inputs' GPU), got cuda:{view.device.id}")
    view = cp.ascontiguousarray(view)
    _check_no_nan(view)
    return 2, 0.0, view, view.shape[1]


def _is_scalar(x) -> bool:
    return isinstance(x, (numbers.Real, np.generic)) or (isinstance(x, np.ndarray) and x.ndim == 0)


def _host_thresholds(x: np.ndarray, Hq=None) -> np.ndarray:
    if x.dtype.kind not in "fiu":
        raise TypeError(f"thresholds: expected a float array, got dtype {x.dtype}")
    host = np.ascontiguousarray(x, dtype=np.float32)
    _check_shape(host.shape, Hq)
    if np.isnan(host).any():
        raise ValueError(f"thresholds: {int(np.isnan(host).sum())} NaN values; use -inf to keep every tile")
    return host


def _device_view(x, Hq=None):
    if framework_of(x) == "unknown":
        raise TypeError(f"thresholds: expected None, a float scalar or an (Hq, T) array, got {type(x).__name__}")
    view = to_cupy(x, "thresholds")
    if view.dtype != cupy().float32:
        raise TypeError(f"thresholds: expected a float32 device array, got {view.dtype}")
    _check_shape(view.shape, Hq)
    return view


def _check_no_nan(view) -> None:
    n_nan = int(cupy().isnan(view).sum())  # one small reduction; a NaN must not reach the gate silently
    if n_nan:
        raise ValueError(f"thresholds: {n_nan} NaN values; use -inf to keep every tile")


def _check_shape(shape, Hq=None) -> None:
    """(Hq, T) with T >= 1; Hq is only known (and checked) once the inputs are."""
    if len(shape) != 2 or shape[1] < 1 or (Hq is not None and shape[0] != Hq):
        rows = "Hq" if Hq is None else Hq
        raise ValueError(f"thresholds: expected shape ({rows}, T) with T >= 1 (or a scalar), got {tuple(shape)}")
