"""Zero-copy interop: CuPy, PyTorch and JAX arrays in, the caller's array type out.

Every input is viewed as a CuPy array through DLPack (no copy); outputs are allocated by the
caller's framework on the inputs' device and viewed the same way, so the kernel writes straight
into them. Launches go on the caller's stream: CuPy's current stream, or torch's current stream of
the device. JAX exposes no stream: its inputs are waited for (``block_until_ready``), the kernel
runs on CuPy's current stream, and that stream is synchronised before the result is handed to JAX.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from ._backend import cupy


def framework_of(x) -> str:
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        return "cupy"
    if mod == "torch":
        return "torch"
    if mod in ("jax", "jaxlib"):
        return "jax"
    if isinstance(x, np.ndarray):
        return "numpy"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return "unknown"


@dataclass
class Frame:
    """How to allocate and stream for the caller's framework."""

    kind: str  # "cupy" | "torch" | "jax" | "dlpack"
    device_id: int
    torch_device: object = None

    def stream(self):
        cp = cupy()
        if self.kind == "torch":
            import torch

            s = torch.cuda.current_stream(self.torch_device)
            return _external_stream(cp, s.cuda_stream, self.device_id)
        return cp.cuda.get_current_stream()

    def empty(self, shape, dtype_name: str):
        """Caller-framework array viewed as CuPy (both returned): (native, cupy_view)."""
        cp = cupy()
        if self.kind == "torch":
            import torch

            t = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.torch_device)
            return t, cp.from_dlpack(_TorchOnCurrentStream(t))
        with cp.cuda.Device(self.device_id):
            a = cp.empty(shape, dtype=_cupy_dtype(dtype_name))
        return a, a

    def wrap(self, native, view):
        """The array to hand back to the caller (JAX gets the CuPy buffer through DLPack)."""
        if self.kind == "jax":
            import jax.dlpack

            return jax.dlpack.from_dlpack(view)
        return native

    def finish(self, stream) -> None:
        if self.kind == "jax":
            stream.synchronize()


def _external_stream(cp, ptr: int, device_id: int):
    """A CuPy handle on a stream another framework owns (no copy, no ownership)."""
    import warnings

    with warnings.catch_warnings():  # newer CuPy deprecates ExternalStream for Stream.from_external
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, device_id)


def _cupy_dtype(name: str):
    cp = cupy()
    return cp.dtype(name)


def to_cupy(x, name: str, frame: Frame | None = None):
    """A zero-copy CuPy view of a GPU array from any supported framework, or a clear TypeError.

    ``frame``: the call's frame, when CuPy's current stream is already its stream (inside ``on(frame)``);
    a torch tensor of a torch frame's device then skips the DLPack stream handshake (see
    ``_TorchOnCurrentStream``).
    """
    kind = framework_of(x)
    if kind == "cupy":
        return x
    if kind == "numpy":
        raise TypeError(
            f"{name}: got a host numpy.ndarray; bsfa_cupy runs on the GPU. Move it there first "
            "(cupy.asarray(x) or torch.from_numpy(x).cuda()), or use bsfa_reference.attention on the CPU"
        )
    if kind == "torch":
        if not x.is_cuda:
            raise TypeError(f"{name}: got a torch tensor on {x.device}; expected a CUDA tensor (x.cuda())")
        if frame is not None and frame.kind == "torch" and x.device == frame.torch_device:
            return cupy().from_dlpack(_TorchOnCurrentStream(x))
    elif kind == "jax":
        platforms = {d.platform for d in x.devices()}
        if platforms != {"gpu"}:
            raise TypeError(f"{name}: got a JAX array on {sorted(platforms)}; expected one on a single GPU")
        x.block_until_ready()
    elif kind == "unknown":
        raise TypeError(f"{name}: expected a CuPy, PyTorch or JAX GPU array, got {type(x).__name__}")
    return cupy().from_dlpack(x)


class _TorchOnCurrentStream:
    """A torch CUDA tensor exported through DLPack without the stream handshake (stream=-1).

    Only for tensors of the call's torch device inside ``on(frame)``: the consumer stream CuPy would
    announce is then torch's current stream itself, so torch's check would find nothing to order, and
    skipping it saves most of a call's host time. Work on other torch streams is the caller's to order,
    as for any torch operation on the current stream.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        return self.tensor.__dlpack__(stream=-1, **kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def frame_for(x) -> Frame:
    """The caller's framework and device, read off the first input (before any conversion)."""
    kind = framework_of(x)
    if kind == "cupy":
        return Frame("cupy", x.device.id)
    if kind == "torch" and x.is_cuda:
        return Frame("torch", x.device.index, x.device)
    if kind == "jax":
        devices = list(x.devices())
        if len(devices) == 1 and devices[0].platform == "gpu":
            return Frame("jax", getattr(devices[0], "local_hardware_id", devices[0].id))
    if kind == "dlpack":
        dev_type, dev_id = x.__dlpack_device__()
        return Frame("dlpack", int(dev_id))
    to_cupy(x, "q")  # raises the clear TypeError for host / unsupported inputs
    raise TypeError(f"q: unsupported array type {type(x).__name__}")


@contextlib.contextmanager
def on(frame: Frame):
    """Run the body on the frame's device and stream (as CuPy's current ones)."""
    cp = cupy()
    with cp.cuda.Device(frame.device_id):
        stream = frame.stream()
        with stream:
            yield stream
