"""BlockMaxPlan: ``block_max_scores``' checks and kernel choice done once per layout, each call cut to binding
pointers and launching, as :class:`~bsfa_cupy.plan.AttentionPlan` does for ``attention``.

``block_max_scores`` spends ~440 us of host time a call (DLPack views, checks, packing ``bsfa::Params``, tensor
maps; measured with torch tensors beside an H200), a third of a 16K call's kernel time there. A plan does
that once against example arrays; :meth:`BlockMaxPlan.run` reads a few attributes of q and k, refuses anything
that differs from the plan, allocates the tile maxima in the caller's framework and launches the kernel
``block_max_scores`` picks, with the same Params apart from the pointers: bitwise its results.
"""
from __future__ import annotations

from . import _tma
from ._arrays import frame_for, on
from ._backend import cupy
from .ops import _block_max_problem, _check_grad, _check_offset_args
from .plan import _check_framework, _framework, _geometries, _io_layouts, _ParamsTemplate, _PlanBase, _Spec

__all__ = ["BlockMaxPlan"]


class BlockMaxPlan(_PlanBase):
    """:func:`bsfa_cupy.block_max_scores` for one layout, checked and chosen once; :meth:`run` per call.

    ``BlockMaxPlan(q, k, causal=..., softmax_scale=..., backend=..., q_start=..., k_start=...)`` takes example
    arrays (torch CUDA tensors or CuPy arrays, both of one framework) and the keyword arguments of
    ``block_max_scores``; it runs every check that function runs, with the same errors, and picks (compiles or
    loads) the same kernel. ``plan.run(q, k)`` then takes arrays of the planned framework, shape, strides, dtype
    and device (anything else raises ValueError / TypeError naming what was expected and what came, before
    anything is launched), allocates the (B, Hq, nQ, nK) float32 tile maxima in that framework and launches on the
    caller's current stream. The example arrays are not kept.
    """

    def __init__(self, q, k, *, causal=True, softmax_scale=None, backend="auto", q_start=None, k_start=0):
        _check_grad([("q", q), ("k", k)])
        _check_offset_args(q_start, k_start)
        kind = _framework(q, "BlockMaxPlan", "block_max_scores")
        frame = frame_for(q)
        with on(frame):
            bm = _block_max_problem(frame, q, k, causal, softmax_scale, backend, q_start, k_start)
            _check_framework((("k", k),), q, kind)
            tm_native, _ = frame.empty(bm.out_shape, "float32")
            kern = bm.kern
            self._geoms = _geometries(kern.box_rows()[:2], (bm.qv, bm.kv)) if kern.tma else ()
            self._launch = (kern.fn, kern.grid(*bm.out_shape[:3]), (kern.threads, 1, 1), kern.smem)
            self._params = _ParamsTemplate.pack(**bm.fields)
        native_type = type(q)
        self._io, layouts = _io_layouts(kind, frame, (q, k))
        self._specs = tuple(_Spec(n, kind, native_type, lay, bool(x.size), "BlockMaxPlan", "block_max_scores")
                            for n, lay, x in zip(("q", "k"), layouts, (bm.qv, bm.kv)))
        self._kind = kind
        self._device_id = frame.device_id
        self._runtime = cupy().cuda.runtime
        self._out_shape, self._dtype = bm.out_shape, tm_native.dtype

    def __repr__(self) -> str:
        B, Hq, nQ, nK = self._out_shape
        return f"BlockMaxPlan({self._kind}, tile maxima ({B}, {Hq}, {nQ}, {nK}), cuda:{self._device_id})"

    def run(self, q, k):
        """The (B, Hq, nQ, nK) float32 tile maxima of q and k, laid out as the plan's examples."""
        sq, sk = self._specs
        qp, kp = sq.pointer(q), sk.pointer(k)
        with self._on_device():
            tm = self._io.empty(self._out_shape, self._dtype)
            fn, grid, block, smem = self._launch
            params = self._params.bind_named(q=qp, k=kp, tile_max=sq.ptr(tm))
            g = self._geoms
            maps = (_tma.tensor_map_at(qp, g[0]), _tma.tensor_map_at(kp, g[1])) if g else ()
            fn(grid, block, (params, *maps), shared_mem=smem, stream=self._io.stream())
        return tm
