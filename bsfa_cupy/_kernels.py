"""Kernel modules: key -> source -> compile/cache -> loaded module, once per (key, defines, device).

A module's launch geometry (threads, dynamic shared memory, the grid it decodes) and the tile
shape are read back from the compiled module's exported constants, so the host never restates
what the CUDA traits define; the tile shape is checked against the reference's definition.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from bsfa_reference.tiles import BLOCK_M, BLOCK_N

from . import _launch
from ._backend import cupy
from ._compile import KernelCompileError, cached_binary, options_for, target
from ._source import kernel_source
from ._variants import Backend, VariantKey

# Query tiles from which a dense call of odd GQA groups takes bsfa_fwd_dense_pair (Module.forward): 4K rows.
# Timed in the card's power-capped steady state on an H200 (Hq = Hkv = 32), it ran 1.02-1.06x the plain dense
# entry at 4K-16K, causal or not, 1.04x at B=8 x 2K, and 0.99x at B=1 x 2K (16 tiles), within the spread of two
# identical builds (2-3 %); beyond 16K, 1.06x at 32K-64K (1.06-1.07x at 64K-128K in NOTES v20).
PAIR_MIN_Q_TILES = 32
# Query tiles from which a dense call of head dim 64 takes bsfa_fwd_dense_wide (Module.forward): 2K rows. On an
# H200 it ran 1.16-1.19x bsfa_fwd_dense at 8K-64K and 1.09x at B=8 x 2K, but 0.95x at B=32 x 1K, where the
# last of its six 192-row tiles holds 64 rows.
WIDE_MIN_Q_TILES = 16


@functools.cache
def compute_capability(device_id: int) -> str:
    return str(cupy().cuda.Device(device_id).compute_capability)


@functools.cache
def sm_count(device_id: int) -> int:
    return int(cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@dataclass
class Kernel:
    fn: object
    threads: int
    smem: int
    grid_kind: int
    sms: int  # multiprocessors of the device (the persistent grid's width)
    tma: int = 0  # > 0: takes tensor maps (q, k[, v]) after the Params, boxes of this many rows
    n_maps: int = 0
    cluster: int = 1  # CTAs per cluster (the sm90ws cluster entries: 2, over pairs of query heads)
    cluster_slots: int = 0  # clusters resident at once (cluster entries; 0: not yet asked)
    pair_tiles: bool = False  # a cluster takes query tiles, not query heads, two at a time (bsfa_fwd_dense_pair)
    q_box: int = 0  # rows of the q map's boxes where they differ from k's and v's (bsfa_fwd_dense_wide)
    head_pairs: bool = False  # a CTA takes two query heads of a GQA group (bsfa_fwd_headpair): Hq even

    def grid(self, B: int, Hq: int, nQ: int) -> tuple[int, int, int]:
        if self.head_pairs:
            if Hq % 2:
                raise ValueError(f"bsfa_fwd_headpair takes query heads two at a time, got Hq={Hq}")
            return _launch.grid(self.grid_kind, B, Hq // 2, nQ, self.sms)
        if self.cluster == 1:
            return _launch.grid(self.grid_kind, B, Hq, nQ, self.sms)
        if not self.pair_tiles and Hq % self.cluster:
            raise ValueError(f"a cluster entry takes query heads {self.cluster} at a time, got Hq={Hq}")
        if not self.cluster_slots:
            self.cluster_slots = _cluster_slots(self)
        if self.pair_tiles:
            g = _launch.grid(self.grid_kind, B, Hq, -(-nQ // self.cluster), self.cluster_slots)
        else:
            g = _launch.grid(self.grid_kind, B, Hq // self.cluster, nQ, self.cluster_slots)
        return (g[0] * self.cluster, g[1], g[2])

    def box_rows(self) -> tuple[int, int, int]:
        """Rows of the boxes of the q, k and v tensor maps it takes."""
        return (self.q_box or self.tma, self.tma, self.tma)

    def launch(self, B: int, Hq: int, nQ: int, params, maps: tuple = ()) -> None:
        """On CuPy's current stream (the caller's, see ``_arrays.on``)."""
        if len(maps) != self.n_maps:
            raise TypeError(f"kernel expects {self.n_maps} tensor maps, got {len(maps)}")
        self.fn(self.grid(B, Hq, nQ), (self.threads, 1, 1), (params, *maps), shared_mem=self.smem)


@dataclass
class Module:
    key: VariantKey
    defines: tuple
    fwd: Kernel
    fwd_varlen: Kernel | None  # packed batches: B is the number of sequences, nQ the longest one's
    block_max: Kernel
    raw: object  # keeps the CUDA module loaded
    # sm90ws only: the split-KV entries (bsfa_fwd_split, fp32 partials; bsfa_fwd_split_pack, two query heads a
    # tile, whose q map has boxes of split_pack_q_box rows) and the merge of their partials
    fwd_split: Kernel | None = None
    fwd_split_pack: Kernel | None = None
    split_pack_q_box: int = 0
    combine: object = None
    combine_warps: int = 0
    # sm90ws only: bsfa_fwd, bsfa_fwd_split and bsfa_fwd_split_pack compiled without the gate, for dense calls
    fwd_dense: Kernel | None = None
    fwd_split_dense: Kernel | None = None
    fwd_split_pack_dense: Kernel | None = None
    # sm90ws at head dim 128, in clustered() only: bsfa_fwd_dense on clusters of two query tiles of one head
    fwd_dense_pair: Kernel | None = None
    # forward() sends dense calls of even GQA groups, and those of odd groups from PAIR_MIN_Q_TILES, to clustered()'s
    # entries; False: to fwd_dense as it is
    dense_clusters: bool = True
    # sm90ws at head dim 64: bsfa_fwd_dense on 192-row query tiles (three consumer warpgroups), which
    # forward() takes for dense calls without keep while dense_wide is True
    fwd_dense_wide: Kernel | None = None
    dense_wide: bool = True
    # sm90ws: where fwd is bsfa_fwd_lag (S a block ahead of the gate exchange), bsfa_fwd, whose S waits for
    # it; where block_max is bsfa_block_max_wide (256-row query tiles), bsfa_block_max on 128-row ones. Same
    # results, slower on an H200 (NOTES v23); for tests and benchmarks: unlagged(), narrow_block_max()
    fwd_unlagged: Kernel | None = None
    block_max_narrow: Kernel | None = None
    # sm90ws: bsfa_fwd_split_lag, bsfa_fwd_split the same way, which split_entry() takes for calls with
    # thresholds, one head a tile and no keep (it writes none)
    fwd_split_lag: Kernel | None = None
    # sm90ws: bsfa_fwd_headpair, two query heads of a GQA group a CTA, each consumer warpgroup a whole BSFA tile
    # of its own head and its own decisions; forward() sends unsplit calls of even groups with thresholds there
    # while headpairs is True (dense ones too while headpairs_dense is True: tests and benchmarks); split calls
    # with thresholds of even groups and more than 64 rows take bsfa_fwd_split_headpair while headpairs is True
    fwd_headpair: Kernel | None = None
    fwd_split_headpair: Kernel | None = None
    headpairs: bool = True
    headpairs_dense: bool = False
    _clustered: Module | None = dataclasses.field(default=None, repr=False)  # clustered(), once loaded

    def forward(self, gated: bool, group: int = 1, q_tiles: int = 0, keep: bool = False) -> Kernel:
        """The unsplit forward entry of a call with (``gated``) or without thresholds, ``group`` = Hq / Hkv,
        ``q_tiles`` = ceil(Nq / 128), returning the keep mask or not (``keep``).

        A dense call at head dim 64 with at least WIDE_MIN_Q_TILES query tiles that returns no keep mask
        takes the 192-row entry (three consumer warpgroups), whose tiles are not the keep mask's.

        A dense call whose GQA groups pair up (``group`` even) takes the cluster entry where the module has
        one (sm90ws, head dim 128): on an H200 it ran 1.00-1.07x the plain dense entry's speed at 8K-32K,
        with the same results bitwise. A long dense call of odd groups (MHA included, at least PAIR_MIN_Q_TILES
        query tiles, causal or not) takes the tile-pair entry, whose two query tiles share each K/V load by
        multicast: 1.02-1.07x the plain one at 4K-128K with Hq = Hkv = 32 (the same results bitwise); at 2K
        it was level. Even groups keep the cluster entry, which the tile pairs only equal on long calls and
        trail on short batched ones, whose shorter tile of a pair hands most of its blocks back unread.
        Calls with thresholds take ``fwd`` (on sm90ws bsfa_fwd_lag), which skips faster than any cluster entry,
        or where their GQA groups pair up bsfa_fwd_headpair (two query heads a CTA, each consumer warpgroup
        deciding its own head's tiles): 1.04-1.18x the speed of bsfa_fwd_lag on an H200 at every keep fraction
        (NOTES v24), with results within rounding of the reference as the others' (its key blocks are 64 keys
        long, so not bitwise theirs).
        """
        if self.fwd_headpair is not None and group % 2 == 0 and (self.headpairs if gated else self.headpairs_dense):
            return self.fwd_headpair
        if gated or self.fwd_dense is None:
            return self.fwd
        if self.fwd_dense_wide is not None and self.dense_wide and not keep and q_tiles >= WIDE_MIN_Q_TILES:
            return self.fwd_dense_wide
        if self.dense_clusters:
            if group % 2 == 0:
                return self.clustered().fwd_dense
            if q_tiles >= PAIR_MIN_Q_TILES and self.clustered().fwd_dense_pair is not None:
                return self.clustered().fwd_dense_pair
        return self.fwd_dense

    def wide_rows(self, on: bool = True) -> Module:
        """This module with its dense calls on bsfa_fwd_dense_wide whether or not they return keep (``on``),
        or never (not ``on``); itself where it has no such entry. For tests and benchmarks: keep, where
        asked for, is then left unwritten."""
        if self.fwd_dense_wide is None:
            return self
        if not on:
            return dataclasses.replace(self, dense_wide=False)
        return dataclasses.replace(self, fwd_dense=self.fwd_dense_wide, dense_wide=False, dense_clusters=False)

    def narrow_block_max(self) -> Module:
        """This module with block_max_scores on bsfa_block_max (128-row query tiles) instead of
        bsfa_block_max_wide (256-row ones, a whole BSFA tile a consumer warpgroup; the same results, 2-5 %
        faster on an H200 at head dim 128, 16 % at 64); itself where it has no wide entry. For tests and
        benchmarks."""
        if self.block_max_narrow is None:
            return self
        return dataclasses.replace(self, block_max=self.block_max_narrow, block_max_narrow=None)

    def head_pairs(self, on: bool = True, dense: bool = False) -> Module:
        """This module with its unsplit calls with thresholds of even GQA groups on bsfa_fwd_headpair (``on``),
        and its dense ones too (``dense``), or on neither (not ``on``); itself where it has no such entry. For
        tests and benchmarks."""
        if self.fwd_headpair is None:
            return self
        return dataclasses.replace(self, headpairs=on, headpairs_dense=on and dense)

    def split_head_pairs(self, gated: bool) -> bool:
        """Whether split calls (with thresholds: ``gated``) of even GQA groups and more than 64 rows take
        bsfa_fwd_split_headpair."""
        return gated and self.headpairs and self.fwd_split_headpair is not None

    def unlagged(self) -> Module:
        """This module with its unsplit calls with thresholds on bsfa_fwd instead of bsfa_fwd_lag (S a block
        ahead of the gate exchange; the same results, 6-18 % faster on an H200) and bsfa_fwd_headpair; itself where
        it has no lagged entry; its split calls then take bsfa_fwd_split. For tests and benchmarks."""
        if self.fwd_unlagged is None:
            return self
        return dataclasses.replace(self, fwd=self.fwd_unlagged, fwd_unlagged=None, fwd_split_lag=None,
                                   headpairs=False)

    def tile_pairs(self) -> Module:
        """This module with every dense call on bsfa_fwd_dense_pair, whatever the GQA group, length and mask
        (:meth:`forward` routes only dense calls of odd groups from PAIR_MIN_Q_TILES there); itself where it has no such
        entry. For tests and benchmarks."""
        pair = self.clustered().fwd_dense_pair
        return self if pair is None else dataclasses.replace(self, fwd_dense=pair, dense_clusters=False)

    def clustered(self) -> Module:
        """This module with its cluster entries in the places of bsfa_fwd, bsfa_fwd_dense and bsfa_block_max (calls
        with thresholds then take bsfa_fwd_mc whatever their GQA group, not bsfa_fwd_headpair); itself where it
        has none (not sm90ws, or head dim 64).

        The cluster entries (sm90ws, head dim 128: bsfa_fwd_mc, bsfa_fwd_dense_mc, bsfa_block_max_mc) run
        on clusters of two CTAs that share K and V loads, two query heads of a GQA group: the caller must
        ensure that Hq / Hkv is even, else a pair spans two K/V heads. Dense calls reach the dense one through
        :meth:`forward`; they are loaded here, at first use. ``fwd_dense_pair`` (bsfa_fwd_dense_pair), whose
        clusters take two neighbouring query tiles of one head instead, for any GQA group, is loaded with them;
        :meth:`forward` routes dense calls of odd groups from PAIR_MIN_Q_TILES query tiles there.
        """
        if self._clustered is None:
            cluster = _read_int(self.raw, "BSFA_FWD_MC") if self.key.arch == "sm90ws" else 0
            if not cluster:
                self._clustered = self
            else:
                f, b = self.fwd, self.block_max
                fwd, dense = (_kernel(self.raw, name, "BSFA_FWD", f.grid_kind, f.sms, f.tma, 3, cluster)
                              for name in ("bsfa_fwd_mc", "bsfa_fwd_dense_mc"))
                bmax = _kernel(self.raw, "bsfa_block_max_mc", "BSFA_BLOCK_MAX", b.grid_kind, b.sms, b.tma, 2, cluster)
                pair = dataclasses.replace(
                    _kernel(self.raw, "bsfa_fwd_dense_pair", "BSFA_FWD", f.grid_kind, f.sms, f.tma, 3, cluster),
                    pair_tiles=True)
                self._clustered = dataclasses.replace(self, fwd=fwd, fwd_dense=dense, block_max=bmax,
                                                      fwd_dense_pair=pair, fwd_unlagged=None,
                                                      block_max_narrow=None, headpairs=False)
        return self._clustered

    def split_entry(self, pack: bool, gated: bool, keep: bool = False, head_pairs: bool = False) -> Kernel:
        """The sm90ws split entry: two query heads a tile (``pack``) or one, with or without the gate; one
        head a tile with the gate takes bsfa_fwd_split_lag where the module has it, unless the call returns
        the keep mask (``keep``), which that entry does not write. ``head_pairs``: bsfa_fwd_split_headpair
        (two heads a CTA, 128 rows each; the plan chose it, see split_head_pairs)."""
        if head_pairs:
            return self.fwd_split_headpair
        if pack:
            return self.fwd_split_pack if gated else self.fwd_split_pack_dense
        if not gated:
            return self.fwd_split_dense
        return self.fwd_split if keep or self.fwd_split_lag is None else self.fwd_split_lag


@dataclass
class SplitKvModule:
    """The split-KV family (kernels_cu/bsfa_fwd_splitkv.cu): three row-tile sizes and the merge of the 64- and
    128-row ones (the 16-row kernel merges its own partials)."""

    key: VariantKey
    defines: tuple
    split: dict  # packed rows per CTA (16, 64, 128) -> (function, threads, dynamic smem bytes)
    combine: object
    combine_warps: int
    raw: object


def _load(key: VariantKey, backend: Backend, device_id: int):
    """(raw module, name) of one variant, compiled or from the cache, tile shape checked."""
    cp = cupy()
    arch_flag, is_cubin = target(key.arch, compute_capability(device_id))
    options = options_for(key.arch, arch_flag) + key.defines() + backend.options()
    name = key.name()
    if backend.defines:
        name += "+" + hashlib.sha256(repr(backend.defines).encode()).hexdigest()[:8]
    binary = cached_binary(kernel_source(key.source), name, options, is_cubin)
    raw = cp.cuda.function.Module()
    raw.load(binary)
    tile = (_read_int(raw, "BSFA_BLOCK_M"), _read_int(raw, "BSFA_BLOCK_N"))
    if tile != (BLOCK_M, BLOCK_N):
        raise KernelCompileError(
            f"bsfa_cupy: {name} was built with {tile[0]}x{tile[1]} tiles, expected the reference's {BLOCK_M}x{BLOCK_N}"
        )
    return raw, name


@functools.cache
def get_splitkv_module(key: VariantKey, backend: Backend, device_id: int) -> SplitKvModule:
    """Compile (first use, or a cache miss) and load one split-KV variant on one device."""
    if key.arch != "splitkv":
        raise ValueError(f"get_splitkv_module: expected a splitkv key, got {key.name()}")
    cp = cupy()
    with cp.cuda.Device(device_id):
        raw, _ = _load(key, backend, device_id)
        split = {}
        for rows in (16, 64, 128):
            fn = raw.get_function(f"bsfa_fwd_split{rows}")
            threads = _read_int(raw, f"BSFA_SPLIT{rows}_THREADS")
            smem = _read_int(raw, f"BSFA_SPLIT{rows}_SMEM_BYTES")
            _opt_in_smem(fn, smem)
            split[rows] = (fn, threads, smem)
        combine = raw.get_function("bsfa_combine")
        warps = _read_int(raw, "BSFA_COMBINE_WARPS")
    return SplitKvModule(key, backend.defines, split, combine, warps, raw)


@functools.cache
def get_module(key: VariantKey, backend: Backend, device_id: int) -> Module:
    """Compile (first use, or a cache miss) and load one variant on one device."""
    if key.arch == "splitkv":
        raise ValueError("backend 'splitkv': the split-KV kernel serves bsfa_cupy.attention only")
    cp = cupy()
    with cp.cuda.Device(device_id):
        raw, _ = _load(key, backend, device_id)
        grid_kind = _read_int(raw, "BSFA_GRID")
        sms = sm_count(device_id)
        # Kernels that take tensor maps (q, k, v for bsfa_fwd; q, k for bsfa_block_max) say so; every
        # module exports these globals, so that no lookup fails (a failed one is an API error that
        # compute-sanitizer reports).
        fwd = _kernel(raw, "bsfa_fwd", "BSFA_FWD", grid_kind, sms, _read_int(raw, "BSFA_FWD_TMA"), 3)
        # The packed-batch entry, where the module has one (every source has one today); it takes what
        # bsfa_fwd takes, tensor maps included.
        fwd_varlen = None
        if _read_int(raw, "BSFA_FWD_VARLEN"):
            fwd_varlen = _kernel(raw, "bsfa_fwd_varlen", "BSFA_FWD", grid_kind, sms, fwd.tma, 3)
        bmax = _kernel(raw, "bsfa_block_max", "BSFA_BLOCK_MAX", grid_kind, sms, _read_int(raw, "BSFA_BLOCK_MAX_TMA"), 2)
        split = {}
        if key.arch == "sm90ws":  # launched as bsfa_fwd (threads, smem, maps), on a grid of its own
            entries = ("fwd_dense", "fwd_split", "fwd_split_pack", "fwd_split_dense", "fwd_split_pack_dense")
            split = {e: _kernel(raw, "bsfa_" + e, "BSFA_FWD", grid_kind, sms, fwd.tma, 3) for e in entries}
            split.update(split_pack_q_box=_read_int(raw, "BSFA_FWD_SPLIT_PACK_Q_BOX"),
                         combine=raw.get_function("bsfa_combine"), combine_warps=_read_int(raw, "BSFA_COMBINE_WARPS"))
            # the entries calls take (NOTES v23); the ones they replace stay for tests and benchmarks
            split["block_max_narrow"], bmax = bmax, dataclasses.replace(
                _kernel(raw, "bsfa_block_max_wide", "BSFA_BLOCK_MAX_WIDE", grid_kind, sms, bmax.tma, 2),
                q_box=_read_int(raw, "BSFA_BLOCK_MAX_WIDE_Q_BOX"))
            if _read_int(raw, "BSFA_FWD_LAG"):
                split["fwd_unlagged"], fwd = fwd, _kernel(raw, "bsfa_fwd_lag", "BSFA_FWD_LAG", grid_kind, sms,
                                                         fwd.tma, 3)
                split["fwd_split_lag"] = _kernel(raw, "bsfa_fwd_split_lag", "BSFA_FWD_LAG", grid_kind, sms, fwd.tma, 3)
            split["fwd_headpair"], split["fwd_split_headpair"] = (dataclasses.replace(
                _kernel(raw, name, "BSFA_FWD_HEADPAIR", grid_kind, sms, _read_int(raw, "BSFA_FWD_HEADPAIR_KV_BOX"), 3),
                q_box=_read_int(raw, "BSFA_FWD_HEADPAIR_Q_BOX"), head_pairs=True)
                for name in ("bsfa_fwd_headpair", "bsfa_fwd_split_headpair"))
            if _read_int(raw, "BSFA_FWD_WIDE_THREADS"):
                split["fwd_dense_wide"] = dataclasses.replace(
                    _kernel(raw, "bsfa_fwd_dense_wide", "BSFA_FWD_WIDE", grid_kind, sms, fwd.tma, 3),
                    q_box=_read_int(raw, "BSFA_FWD_WIDE_Q_BOX"))
    return Module(key, backend.defines, fwd, fwd_varlen, bmax, raw, **split)


def _read_int(raw, symbol: str) -> int:
    cp = cupy()
    ptr = raw.get_global_var(symbol)
    ptr = ptr[0] if isinstance(ptr, tuple) else ptr
    host = np.zeros(1, np.int32)
    cp.cuda.runtime.memcpy(host.ctypes.data, int(ptr), 4, cp.cuda.runtime.memcpyDeviceToHost)
    return int(host[0])


def _kernel(raw, fn_name: str, prefix: str, grid_kind: int, sms: int, tma: int, n_maps: int,
            cluster: int = 1) -> Kernel:
    fn = raw.get_function(fn_name)
    threads, smem = _read_int(raw, prefix + "_THREADS"), _read_int(raw, prefix + "_SMEM_BYTES")
    k = Kernel(fn, threads, smem, grid_kind, sms, tma, n_maps if tma else 0, cluster)
    _opt_in_smem(fn, k.smem)
    return k


def _cluster_slots(k: Kernel) -> int:
    """Clusters of a cluster entry resident at once (the driver's occupancy query), at most SMs / cluster.

    The persistent grid is that many clusters wide: a wider one would start its last clusters only as
    others finish, each with a full share of the static tile list.
    """
    from . import _tma

    d = _tma._driver()
    cfg = d.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = k.cluster * (k.sms // k.cluster), 1, 1
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = k.threads, 1, 1
    cfg.sharedMemBytes = k.smem
    cfg.numAttrs = 0  # the cluster shape is the kernel's own (__cluster_dims__)
    err, n = d.cuOccupancyMaxActiveClusters(d.CUfunction(int(k.fn.ptr)), cfg)
    if err != d.CUresult.CUDA_SUCCESS or n < 1:
        raise RuntimeError(f"cuOccupancyMaxActiveClusters: {err!r}, {n} clusters of {k.cluster} CTAs, {k.smem} bytes")
    return min(int(n), k.sms // k.cluster)


def _opt_in_smem(fn, smem: int) -> None:
    if smem > 48 * 1024:  # above the default window a kernel must opt in
        driver = cupy().cuda.driver
        attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
        driver.funcSetAttribute(fn.ptr, attr, smem)
