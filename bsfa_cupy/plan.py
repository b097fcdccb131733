"""AttentionPlan: ``attention``'s validation and kernel choice done once per layout, each call cut to binding
pointers and launching.

Decode and short chunks are host-bound: the kernels take 0.06-0.2 ms on an H200 while ``attention``
spends as long again on DLPack views, packing ``bsfa::Params``, allocations through DLPack, stream
wrapping and checks that cannot change between two calls of one layer. A plan does all of that
against example arrays; :meth:`AttentionPlan.run` then reads a few attributes of each array (type,
shape, strides, dtype, device, pointer), refuses anything that differs from the plan, allocates out
and lse in the caller's framework and launches the kernel ``attention`` would have picked, with the
same Params apart from the pointers, so the results are bitwise those of ``attention``.
"""
from __future__ import annotations

import contextlib
import struct

import numpy as np

from . import _launch, _splitkv, _tma
from ._arrays import _external_stream, frame_for, framework_of, on, to_cupy
from ._backend import cupy
from .device_thresholds import DeviceThresholds
from .ops import _call_args, _check_grad, _output_fields, _problem, _target

__all__ = ["AttentionPlan"]

#: Params fields that run fills per call (the split-KV partials per stream, see AttentionPlan._workspace).
_CALL_POINTERS = ("q", "k", "v", "out", "lse")
_OFFSETS = {name: _launch.PARAMS.fields[name][1]
            for name in _CALL_POINTERS + ("o_part", "lse_part", "split_done", "thresholds", "tile_max")}
if [_OFFSETS[n] for n in _CALL_POINTERS] != [_OFFSETS["q"] + 8 * i for i in range(5)]:  # pragma: no cover
    raise ImportError("bsfa::Params: q, k, v, out and lse are expected as five consecutive pointers")
_CALL = struct.Struct("<5Q")
_ONE = struct.Struct("<Q")
#: Streams whose split-KV partials a plan keeps (the oldest is dropped past this).
MAX_STREAMS = 8
_LABELS = ("shape", "strides", "dtype", "device")


def _geometries(box_rows, views) -> tuple:
    """The tensor-map geometries of q, k, v (boxes of ``box_rows[i]`` rows); each map made once here, so that
    attention's errors (missing bindings, driver refusals) come from the plan, not from a run."""
    for x, rows in zip(views, box_rows):
        _tma.tensor_map(x, rows)
    return tuple(_tma.geometry(x, rows) for x, rows in zip(views, box_rows))


class _ParamsTemplate:
    """``bsfa::Params`` with everything but the pointers filled in, as bytes; bound to a call's pointers by a
    bytearray copy and one struct store (a NumPy structured copy costs about 10 us, this well under 1)."""

    def __init__(self, raw: bytes):
        self._raw = raw

    @classmethod
    def pack(cls, **fields):
        return cls(_launch.pack(**fields).tobytes())

    def _filled(self, ptrs) -> bytearray:
        buf = bytearray(self._raw)
        for name, ptr in ptrs.items():
            _ONE.pack_into(buf, _OFFSETS[name], ptr)
        return buf

    def with_pointers(self, **ptrs) -> "_ParamsTemplate":
        return _ParamsTemplate(bytes(self._filled(ptrs)))

    def bind_named(self, **ptrs) -> np.void:
        """The Params with the named pointers filled in (a fresh buffer, as :meth:`bind`)."""
        return np.frombuffer(self._filled(ptrs), _launch.PARAMS)[0]

    def bind(self, q: int, k: int, v: int, out: int, lse: int, thresholds: int = 0) -> np.void:
        # A fresh buffer per call: the same plan may be run from several threads.
        buf = bytearray(self._raw)
        _CALL.pack_into(buf, _OFFSETS["q"], q, k, v, out, lse)
        if thresholds:  # another layer's table of the planned shape
            _ONE.pack_into(buf, _OFFSETS["thresholds"], thresholds)
        return np.frombuffer(buf, _launch.PARAMS)[0]


def _torch_layout(x):
    return (x.shape, x.stride(), x.dtype, x.device)


def _cupy_layout(x):
    return (x.shape, x.strides, x.dtype, x.device.id)


def _torch_ptr(x) -> int:
    return x.data_ptr()


def _cupy_ptr(x) -> int:
    return x.data.ptr


class _Spec:
    """The planned type and layout of one argument; :meth:`pointer` checks an array against it."""

    __slots__ = ("name", "type", "layout", "nonempty", "read", "ptr", "torch", "what", "plan", "call")

    def __init__(self, name, kind, type_, layout, nonempty, plan="AttentionPlan", call="attention"):
        self.name, self.type, self.layout, self.nonempty = name, type_, tuple(layout), nonempty
        self.plan, self.call = plan, call  # the plan class and the function it stands for, named in errors
        self.torch = kind == "torch"
        self.read, self.ptr = (_torch_layout, _torch_ptr) if self.torch else (_cupy_layout, _cupy_ptr)
        self.what = f"{type_.__module__.split('.')[0]}.{type_.__name__}"

    def pointer(self, x) -> int:
        if type(x) is not self.type and not isinstance(x, self.type):
            raise TypeError(
                f"{self.name}: expected a {self.what} like the plan's example arrays, got {_type_name(x)} "
                f"(a plan binds one framework; for JAX arrays call bsfa_cupy.{self.call})"
            )
        if self.read(x) != self.layout:
            raise self._mismatch(self.read(x))
        if self.torch and x.requires_grad:
            _check_grad([(self.name, x)])
        p = self.ptr(x)
        if p % 16 and self.nonempty:  # cp.async and the TMA move 16-byte rows
            raise ValueError(f"{self.name}: rows must start on 16-byte boundaries, got data pointer {p:#x}")
        return p

    def _mismatch(self, got):
        unit = " (elements)" if self.torch else " (bytes)"
        diffs = []
        for label, want, have in zip(_LABELS, self.layout, got):
            if want != have:
                label = label + unit if label == "strides" else label
                diffs.append(f"{label}: expected {_show(want)}, got {_show(have)}")
        exc = TypeError if self.layout[2] != got[2] else ValueError
        return exc(
            f"{self.name}: does not match the plan: " + "; ".join(diffs)
            + f" (build another {self.plan} for this layout, or call bsfa_cupy.{self.call})"
        )


def _show(x):
    if isinstance(x, tuple):  # torch.Size too
        return str(tuple(int(i) for i in x))
    if type(x).__module__.split(".")[0] == "torch" and type(x).__name__ == "device":
        return str(x)
    if isinstance(x, int):
        return f"cuda:{x}"
    return str(x)


def _type_name(x) -> str:
    t = type(x)
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


class _RawStream:
    """A stream handle as CuPy's ``Function.__call__(stream=...)`` takes it (it only reads ``.ptr``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


class _TorchIO:
    """torch: outputs from torch's caching allocator, launches on torch's current stream of the device."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        index = device.index
        if raw is not None:
            self._handle = lambda: raw(index)
        else:  # pragma: no cover - older torch
            self._handle = lambda: torch.cuda.current_stream(device).cuda_stream
        self._streams: dict[int, _RawStream] = {}

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def stream(self) -> _RawStream:
        h = self._handle()
        s = self._streams.get(h)
        if s is None:
            if len(self._streams) >= 64:
                self._streams.clear()
            s = self._streams[h] = _RawStream(h)
        return s

    def current(self, stream, device_id):
        """Make ``stream`` CuPy's current one (for allocations from CuPy's stream-ordered pool)."""
        return _external_stream(cupy(), stream.ptr, device_id)


class _CupyIO:
    """CuPy: outputs from CuPy's pool, launches on CuPy's current stream (both of the current device)."""

    def __init__(self, cp):
        self.cp = cp

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype=dtype)

    def stream(self):
        return self.cp.cuda.get_current_stream()

    def current(self, stream, device_id):
        return contextlib.nullcontext()


def _framework(q, plan: str, call: str) -> str:
    """q's framework; JAX arrays are refused (no stream to launch on), naming the function to call instead."""
    kind = framework_of(q)
    if kind not in ("torch", "cupy", "numpy", "unknown"):
        raise TypeError(
            f"q: {plan} takes torch CUDA tensors or CuPy arrays, got {_type_name(q)}; for JAX arrays "
            f"call bsfa_cupy.{call} (JAX exposes no stream, so each call waits for its inputs anyway)"
        )
    return kind


def _check_framework(named, q, kind: str) -> None:
    """The other arrays of a plan are of q's framework."""
    for name, x in named:
        if framework_of(x) != kind:
            raise TypeError(f"{name}: expected a {_type_name(q)} like q (a plan binds one framework), "
                            f"got {_type_name(x)}")


def _io_layouts(kind: str, frame, arrays):
    """A plan's allocator and stream source for its framework, and the planned layouts of ``arrays``."""
    if kind == "torch":
        import torch

        return _TorchIO(torch, frame.torch_device), [_torch_layout(x) for x in arrays]
    return _CupyIO(cupy()), [_cupy_layout(x) for x in arrays]


class _PlanBase:
    """What the plans share: assembly from parts (host tests) and running on the plan's device."""

    @classmethod
    def _assemble(cls, **attrs):
        """A plan from its parts, for host tests that stand in for the GPU pieces."""
        plan = cls.__new__(cls)
        plan.__dict__.update(attrs)
        return plan

    @contextlib.contextmanager
    def _on_device(self):
        """The plan's GPU current for the block, the caller's restored after it."""
        rt = self._runtime
        prev = rt.getDevice()
        dev = self._device_id
        if prev != dev:
            rt.setDevice(dev)
        try:
            yield
        finally:
            if prev != dev:
                rt.setDevice(prev)


class AttentionPlan(_PlanBase):
    """:func:`bsfa_cupy.attention` for one layout, validated and chosen once; :meth:`run` per call.

    ``AttentionPlan(q, k, v, thresholds, causal=..., ...)`` takes example arrays (torch CUDA tensors or
    CuPy arrays, all three of one framework) and the keyword arguments of ``attention`` (except
    ``out`` and ``return_keep``). It runs every check ``attention`` runs, with the same errors, picks
    the same kernel (split-KV routing included; the kernel is compiled or loaded here), copies array
    thresholds once into a :class:`DeviceThresholds` (``plan.thresholds``; later writes to the source
    do not reach the plan), and packs ``bsfa::Params`` with everything but the pointers.

    ``plan.run(q, k, v, out=None)`` then takes arrays of the planned framework, shape, strides, dtype
    and device (anything else raises ValueError / TypeError naming what was expected and what came,
    before anything is launched), allocates out (unless given, with the planned contiguous layout)
    and lse in that framework, and launches on the caller's current stream: torch's current stream of
    the device, or CuPy's. Returns out, or (out, lse) when planned with ``return_lse=True``. Results
    are bitwise those of ``attention`` with the same arguments. The example arrays are not kept.

    Split-KV plans keep their fp32 partials per stream (allocated from CuPy's pool on that stream at
    its first run, at most ``MAX_STREAMS`` streams), so a plan may run on several streams at once;
    runs on one stream are ordered by the stream. JAX arrays: call ``attention`` (JAX exposes no
    stream, so every call waits anyway).
    """

    def __init__(self, q, k, v, thresholds=None, *, causal=True, softmax_scale=None, return_lse=False,
                 num_splits=None, backend="auto", q_start=None, k_start=0):
        num_splits, backend = _call_args(q, k, v, q_start, k_start, num_splits, backend)
        kind = _framework(q, "AttentionPlan", "attention")
        frame = frame_for(q)
        cp = cupy()
        with on(frame) as stream:
            qv, kv, vv = to_cupy(q, "q", frame), to_cupy(k, "k", frame), to_cupy(v, "v", frame)
            _check_framework((("k", k), ("v", v)), q, kind)
            prob = _problem(frame, qv, kv, vv, thresholds, softmax_scale, backend, num_splits, q_start, k_start)
            copied = False
            if isinstance(thresholds, DeviceThresholds):
                self.thresholds = thresholds
            elif prob.fields["thresholds"] is not None:
                # attention's device view may alias the caller's array; the plan owns its copy.
                prob.fields["thresholds"] = cp.array(prob.fields["thresholds"], dtype=cp.float32, copy=True)
                self.thresholds = DeviceThresholds._adopt(prob.fields["thresholds"], frame.device_id)
                copied = True
            else:
                self.thresholds = None
            out_native, out_view = frame.empty(prob.out_shape, prob.dtype)
            lse_native, lse_view = frame.empty(prob.lse_shape, "float32")
            target = _target(prob, backend, causal, num_splits)
            fields = prob.params(_output_fields(out_view, lse_view, None))
            for name in _CALL_POINTERS:
                fields[name] = None
            geoms = ()
            if target.mod is not None:
                g = _splitkv.grid(target.split, prob.B, prob.Nq, prob.Hkv)
                fields.update(num_splits=target.split.splits, pack_heads=target.split.pack)
                self._launch_split = (target.mod, target.split, g, prob.B * prob.Hq * prob.Nq)
                self._launch_fwd = None
                if target.split.ws:
                    geoms = _geometries(_splitkv.ws_box_rows(target.mod, target.split), (qv, kv, vv))
            elif target.kern is not None:
                kern = target.kern
                if kern.tma:
                    geoms = _geometries(kern.box_rows(), (qv, kv, vv))
                self._launch_split = None
                self._launch_fwd = (kern.fn, kern.grid(prob.B, prob.Hq, prob.nQ), (kern.threads, 1, 1), kern.smem)
            else:  # an empty split-KV call: nothing to launch
                self._launch_split = self._launch_fwd = None
            self._geoms = geoms
            self._params = _ParamsTemplate.pack(**fields)
            if copied:  # complete before a run on another stream reads it
                stream.synchronize()

        native_type = type(q)
        io, layouts = _io_layouts(kind, frame, (q, k, v, out_native))
        names = ("q", "k", "v", "out")
        sizes = (qv.size, kv.size, vv.size, out_view.size)
        self._specs = tuple(_Spec(n, kind, native_type, lay, bool(s)) for n, lay, s in zip(names, layouts, sizes))
        self._io = io
        self._kind = kind
        self._device_id = frame.device_id
        self._runtime = cp.cuda.runtime
        self._out_shape, self._lse_shape = prob.out_shape, prob.lse_shape
        self._dtype, self._lse_dtype = out_native.dtype, lse_native.dtype
        self._return_lse = bool(return_lse)
        self._workspaces: dict[int, tuple] = {}
        self.split = target.split  # the split-KV plan (rows, pack, splits), None off that path
        self.shapes = dict(q=prob.out_shape, k=(prob.B, prob.Nk, prob.Hkv, prob.D), out=prob.out_shape,
                           lse=prob.lse_shape)

    def __repr__(self) -> str:
        route = "split-KV" if self._launch_split else ("forward" if self._launch_fwd else "empty")
        return (f"AttentionPlan({self._kind}, q {self.shapes['q']}, k/v {self.shapes['k']}, {route}"
                f"{'' if self.split is None else f', splits={self.split.splits}'}, cuda:{self._device_id})")

    def run(self, q, k, v, *, out=None, thresholds=None):
        """out (and lse when planned with ``return_lse``) for arrays laid out as the plan's examples.

        ``thresholds``: None (the plan's), or a :class:`DeviceThresholds` of the planned (Hq, T) shape on the
        plan's GPU, e.g. each layer's own table, so that one plan serves every layer of a model step.
        """
        sq, sk, sv, so = self._specs
        qp, kp, vp = sq.pointer(q), sk.pointer(k), sv.pointer(v)
        tp = 0 if thresholds is None else self._thresholds_pointer(thresholds)
        io = self._io
        if out is not None:
            op = so.pointer(out)
        with self._on_device():
            if out is None:
                out = io.empty(self._out_shape, self._dtype)
                op = so.ptr(out)
            lse = io.empty(self._lse_shape, self._lse_dtype)
            stream = io.stream()
            if self._launch_split is not None:
                mod, split, grid, rows = self._launch_split
                params = self._workspace(stream).bind(qp, kp, vp, op, so.ptr(lse), tp)
                maps = self._maps(qp, kp, vp) if self._geoms else ()
                _splitkv.launch_kernels(mod, split, grid, rows, params, stream=stream, maps=maps)
            elif self._launch_fwd is not None:
                fn, grid, block, smem = self._launch_fwd
                params = self._params.bind(qp, kp, vp, op, so.ptr(lse), tp)
                maps = self._maps(qp, kp, vp) if self._geoms else ()
                fn(grid, block, (params, *maps), shared_mem=smem, stream=stream)
        return (out, lse) if self._return_lse else out

    def _maps(self, qp: int, kp: int, vp: int) -> tuple:
        g = self._geoms
        return _tma.tensor_map_at(qp, g[0]), _tma.tensor_map_at(kp, g[1]), _tma.tensor_map_at(vp, g[2])

    def _thresholds_pointer(self, thr) -> int:
        planned = getattr(self, "thresholds", None)
        if not isinstance(thr, DeviceThresholds):
            raise TypeError(
                f"thresholds: expected a bsfa_cupy.DeviceThresholds (validated once) or None, got {_type_name(thr)}"
            )
        if planned is None:
            raise ValueError(
                "thresholds: this plan was built without a thresholds array (dense or a scalar); build it with one "
                "of the tables to pass others per run"
            )
        if tuple(thr.array.shape) != tuple(planned.array.shape):
            raise ValueError(
                f"thresholds: expected shape {tuple(planned.array.shape)} (Hq, T) as planned, "
                f"got {tuple(thr.array.shape)}"
            )
        if thr.device_id != self._device_id:
            raise ValueError(f"thresholds: expected a table on cuda:{self._device_id}, got cuda:{thr.device_id}")
        return thr.array.data.ptr

    def _workspace(self, stream) -> _ParamsTemplate:
        """The Params template holding this stream's split-KV partials, allocated at the stream's first run.

        Per stream, not per call: two streams never share partials, one stream orders its own runs, and a
        call costs no allocation. They come from CuPy's pool with the stream current, so that when dropped
        (past MAX_STREAMS, or with the plan) the pool reuses them only behind that stream's work.
        """
        entry = self._workspaces.get(stream.ptr)
        if entry is not None:
            return entry[0]
        _, split, grid, _ = self._launch_split
        B, Nq, Hq, D = self._out_shape
        with self._io.current(stream, self._device_id):
            o_part, lse_part, done = _splitkv.workspace(split, grid, B, Nq, Hq, D)
        tmpl = self._params.with_pointers(o_part=o_part.data.ptr, lse_part=lse_part.data.ptr,
                                          split_done=0 if done is None else done.data.ptr)
        if len(self._workspaces) >= MAX_STREAMS:
            self._workspaces.pop(next(iter(self._workspaces)))
        self._workspaces[stream.ptr] = (tmpl, o_part, lse_part, done)
        return tmpl
