"""Split-KV for few query rows against long K/V (decode, chunked prefill): plan, routing, launch.

The one-CTA-per-(128-row query tile, head, batch) kernels leave most of the GPU idle when
B * Hq * nQ is small next to the SM count, and a 128-row tile is mostly padding for one decode row.
``kernels_cu/bsfa_fwd_splitkv.cu`` packs the query heads of a GQA group into one CTA of 16, 64 or
128 rows ((head, query row) pairs of one reference query tile, so each head's gate still sees its
exact tile maximum; at 16 rows the CTA's 4 warps split each key tile instead of its rows), cuts
the key tiles of each query tile into ``num_splits`` ranges over as many CTAs, and merges the fp32
partials by the rule of ``bsfa_reference.merge_partials`` (in the 16-row kernel's last CTA of each row
group, else with ``bsfa_combine``).

On Hopper, chunks (Nq >= WS_MIN_NQ, or WS_MIN_NQ_PACKED in even GQA groups) take the warp-specialised
TMA/wgmma forward's split entry instead (``bsfa_fwd_split`` of ``kernels_cu/bsfa_fwd_sm90ws.cu``, a ``ws``
plan): one 128-row query tile of one head per work tile -- or, up to 64 rows in even groups, two heads of
a group, one per consumer warpgroup (``bsfa_fwd_split_pack``, ``pack`` 2) -- its 128-key blocks cut into
``num_splits`` contiguous ranges walked by the persistent grid, the partials merged by that module's
``bsfa_combine``. Its tensor cores do the chunk's P V and Q K^T at wgmma rates, where the mma.sync
64- and 128-row kernels are compute-bound. Everything here but :func:`launch` is plain Python
(CPU-tested).
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

from bsfa_reference.tiles import BLOCK_M, BLOCK_N

from . import _launch
from ._backend import cupy

#: Most splits a call may ask for (the fp32 workspace grows with it; far past any useful count).
MAX_SPLITS = 1024
#: Most query heads in one CTA: the kernel keeps one bit per head slot in a 32-bit keep mask.
MAX_PACK = 32
#: Head dims the split-KV kernel is built for.
HEAD_DIMS = (64, 128)
#: Packed rows of the key-split kernel (bsfa_fwd_split16): its 4 warps hold the same 16 rows and
#: split each 64-key tile into 16-key slices, so a decode step (R = 1 row per head) is not 15/16
#: padding in every warp's MMAs as in the 64-row kernel.
KEY_SPLIT_ROWS = 16
#: Packed rows per CTA of the split kernel that merges its own partials (the last CTA of each row group,
#: kernels_cu/bsfa_combine.cuh); the others are followed by the bsfa_combine launch.
SELF_MERGING_ROWS = KEY_SPLIT_ROWS
#: Split-kernel CTAs resident per SM, by packed rows per CTA, from the shared memory at head dim 128
#: (about 227 KB per SM for CTAs; Q rows + 3 K tiles and 3 (16 rows) or 2 V tiles of 64 rows, 272
#: bytes a row): 64 rows 102 KB (216 registers) -> 2, 128 rows 119 KB -> 1.  16 rows (106 KB, 181
#: registers) would fit 2, but one per SM moves K and V faster on an H200 (decode 1 x 128K, B=1,
#: Hq=32, Hkv=8: 16 splits, one CTA per SM, 0.139 ms; 32 or 33 splits, two per SM, 0.145 ms), so
#: the heuristic counts 1.  (Head dim 64 would fit more CTAs; the heuristic assumes 128.)
CTAS_PER_SM = {16: 1, 64: 2, 128: 1}
#: ... and with thresholds: the vote's barrier on every gated tile stalls a lone CTA, and two per SM
#: hide it (1 x 128K, rho = 0.25: 33 splits 0.148 ms, 16 splits 0.171 ms).
CTAS_PER_SM_GATED = {16: 2, 64: 2, 128: 1}
#: Fewest key tiles a split is given by the heuristic: shorter ranges cost more in the merge and
#: in the prologue (Q and the first K tiles) than they gain in parallelism.
MIN_TILES_PER_SPLIT = 4
#: The heuristic takes the fewest splits whose last wave is at least this full, relative to the
#: best split count (FlashAttention-2's num_splits_heuristic): fewer splits, less merging.
WAVE_EFFICIENCY = 0.85
#: auto takes the split path for Nq up to this (packing pays even on a full GPU), and beyond it
#: only while the unsplit kernels would not fill one wave (B * Hq * nQ < SMs).
PACK_NQ = 64
#: ... and only for keys this long: below, the unsplit kernels are short anyway and the merge's
#: second launch would not pay for itself.
MIN_AUTO_NK = 2048
#: Fewest query rows that ``auto`` sends to the warp-specialised split entry on Hopper (a ``ws`` plan):
#: from here on a mma.sync split CTA holds one head's rows only (pack 1), and the wgmma kernel's
#: 128-row tile, padding included, runs faster (H200, B=1, Hq=32, Hkv=8, D=128, Nk=128K: 64 rows
#: one head a tile 0.52 vs 0.61 ms, 128 rows 0.49 vs 1.21 ms).
WS_MIN_NQ = 33
#: ... and for GQA groups of an even size, where the entry packs two heads a tile (WS_PACK), from this
#: many rows (same shape: 32 rows 0.28 vs 0.32 ms, 64 rows 0.28 vs 0.60; 16 rows, the whole group in
#: one mma.sync CTA, 0.27 vs 0.18 ms).
WS_MIN_NQ_PACKED = 17
#: Query heads of one GQA group in one 128-row tile of the warp-specialised split entry
#: (``bsfa_fwd_split_pack``), for Nq <= 128 / WS_PACK and groups of a multiple of WS_PACK heads: each
#: consumer warpgroup holds one head's rows, so one K/V load serves both and each decides its own gates.
WS_PACK = 2


def check_num_splits(num_splits):
    """None (heuristic) or an int in [1, MAX_SPLITS]; raised before anything is launched."""
    if num_splits is None:
        return None
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits: expected an int >= 1 or None (heuristic), got {type(num_splits).__name__}")
    if not 1 <= int(num_splits) <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected an int in [1, {MAX_SPLITS}] or None (heuristic), got {num_splits}")
    return int(num_splits)


@dataclass(frozen=True)
class Plan:
    rows: int  # packed rows per CTA: 16, 64 or 128 (the kernel entry)
    pack: int  # query heads of a GQA group per CTA
    n_packs: int  # CTAs per (query tile, K/V head) before splitting: ceil(G / pack)
    splits: int
    #: > 0: the warp-specialised split entry (rows 128, pack 1 or WS_PACK), a persistent grid this many CTAs wide
    ws_width: int = 0
    #: the call has thresholds; a ws plan without runs the split entry compiled without the gate
    gated: bool = True
    #: a ws plan on bsfa_fwd_split_headpair: WS_PACK heads of a group a CTA, up to 128 rows each
    headpair: bool = False

    @property
    def ws(self) -> bool:
        return self.ws_width > 0

    def grid(self, B: int, Hkv: int, nQ: int) -> tuple[int, int, int]:
        if self.ws:
            return (self.ws_width, 1, 1)
        return (self.splits, nQ * Hkv * self.n_packs, B)


def pack_shape(Nq: int, G: int) -> tuple[int, int]:
    """(rows, pack): a head's R = min(Nq, 128) rows of a reference query tile stay in one CTA.

    The key-split 16-row kernel takes the shapes whose whole GQA group fits one m16 block (R * G <=
    16, e.g. decode with up to 16 heads a group): the same single pack, so K and V are read as
    often as by the 64-row kernel. A larger group stays on the 64-row kernel rather than being cut
    into more packs, each of which would read K and V again.
    """
    R = max(1, min(Nq, BLOCK_M))
    if R * min(G, MAX_PACK) <= KEY_SPLIT_ROWS:
        return KEY_SPLIT_ROWS, max(1, min(G, MAX_PACK))
    rows = 64 if R <= 64 else 128
    return rows, max(1, min(G, rows // R, MAX_PACK))


def heuristic_splits(ctas: int, nK: int, sms: int, rows: int = 64, gated: bool = False) -> int:
    """Splits for ``ctas`` split-kernel CTAs (at one split) of ``rows`` packed rows.

    1 when the GPU is full already (ctas >= resident slots). Where at least two splits of every
    CTA fit one wave, the most that do (slots // ctas): these calls are memory bound and one full
    wave streams K and V best (H200, B=1, Hq=32, Hkv=8, 16 x 128K on 64-row CTAs: 33 splits 0.179
    ms, 29 0.180, 16 0.209). Else the fewest splits whose waves are filled at least
    WAVE_EFFICIENCY as well as the best count's. Each split keeps MIN_TILES_PER_SPLIT key tiles or
    more. ``gated``: the call has thresholds (CTAS_PER_SM_GATED).
    """
    slots = sms * (CTAS_PER_SM_GATED if gated else CTAS_PER_SM)[rows]
    if ctas <= 0 or nK <= 0 or ctas >= slots:
        return 1
    longest = max(1, min(nK // MIN_TILES_PER_SPLIT, MAX_SPLITS))
    if slots // ctas >= 2:
        return min(slots // ctas, longest)
    cap = min(longest, 2 * -(-slots // ctas))

    def efficiency(s):
        waves = ctas * s / slots
        return waves / -(-ctas * s // slots)

    best = max(efficiency(s) for s in range(1, cap + 1))
    return next(s for s in range(1, cap + 1) if efficiency(s) >= WAVE_EFFICIENCY * best)


@functools.lru_cache(maxsize=1024)  # a per-layer loop repeats the same shapes: plan once
def plan(B: int, Nq: int, Nk: int, Hq: int, Hkv: int, sms: int, num_splits=None, gated: bool = False,
         ws: bool = False, head_pairs: bool = False) -> Plan:
    """The split plan of a call; ``ws``: for the warp-specialised split entry (one head per 128-row tile, or
    WS_PACK heads of a group up to 64 rows; at most one CTA per SM walking the (query tile, split, head,
    batch) list). ``head_pairs`` (ws): more than 64 rows of an even group go to bsfa_fwd_split_headpair, WS_PACK
    heads a CTA with 128 rows each."""
    G = Hq // Hkv
    nQ, nK = -(-Nq // BLOCK_M), -(-Nk // BLOCK_N)
    if ws:
        headpair = head_pairs and Nq > BLOCK_M // WS_PACK and G % WS_PACK == 0
        pack = WS_PACK if headpair or (Nq <= BLOCK_M // WS_PACK and G % WS_PACK == 0) else 1
        tiles = B * (Hq // pack) * nQ
        splits = num_splits if num_splits is not None else heuristic_splits(tiles, nK, sms, BLOCK_M, gated)
        if tiles * splits > _launch.MAX_TILES:
            raise ValueError(
                f"split-KV: expected at most {_launch.MAX_TILES} work tiles (B * Hq / {pack} * ceil(Nq / {BLOCK_M}) "
                f"* num_splits), got {tiles} * {splits}"
            )
        return Plan(BLOCK_M, pack, G // pack, splits, ws_width=max(1, min(sms, tiles * splits)), gated=gated,
                    headpair=headpair)
    rows, pack = pack_shape(Nq, G)
    n_packs = -(-G // pack)
    splits = num_splits if num_splits is not None else heuristic_splits(B * Hkv * nQ * n_packs, nK, sms, rows, gated)
    return Plan(rows, pack, n_packs, splits)


def ws_wanted(arch: str, Nq: int, G: int, hopper_ws: bool) -> bool:
    """Whether a split call takes the warp-specialised split entry: ``backend="sm90ws"`` with
    ``num_splits`` always; ``auto`` where that kernel runs (``hopper_ws``: compute capability 9.0 with
    tensor maps) for Nq >= WS_MIN_NQ, or Nq >= WS_MIN_NQ_PACKED with GQA groups of G heads that it packs
    in pairs. ``splitkv`` never (the mma.sync family)."""
    if arch == "sm90ws":
        return True
    if arch != "auto" or not hopper_ws:
        return False
    return Nq >= WS_MIN_NQ or (Nq >= WS_MIN_NQ_PACKED and G % WS_PACK == 0)


def wanted(arch: str, num_splits, B: int, Nq: int, Nk: int, Hq: int, D: int, sms: int) -> bool:
    """Whether a call takes the split-KV path.

    ``backend="splitkv"`` or an explicit ``num_splits`` always does (``num_splits`` with another
    explicit backend is an error, raised by the caller). ``auto`` does for head dims 64 and 128 and
    Nk >= MIN_AUTO_NK when Nq <= PACK_NQ (decode, short chunks: packing the GQA group and splitting
    the keys win) or when the unsplit kernels would leave SMs idle (B * Hq * nQ < SMs); prefill
    shapes (many query tiles) keep the unsplit kernels.
    """
    if arch == "splitkv" or num_splits is not None:
        return True
    if arch != "auto" or D not in HEAD_DIMS or Nq == 0 or Nk < MIN_AUTO_NK:
        return False
    return Nq <= PACK_NQ or B * Hq * (-(-Nq // BLOCK_M)) < sms


def grid(p: Plan, B: int, Nq: int, Hkv: int) -> tuple[int, int, int]:
    """The split kernel's grid, refused where CUDA's limits would truncate it."""
    g = p.grid(B, Hkv, -(-Nq // BLOCK_M))
    if p.ws:  # persistent: the tile count was checked by plan()
        return g
    if g[1] > 65535 or B > 65535:
        raise ValueError(
            f"split-KV grid: expected at most 65535 (query tile, K/V head, pack) triples and batch entries, got "
            f"{g[1]} and B={B}"
        )
    return g


def workspace(p: Plan, g: tuple, B: int, Nq: int, Hq: int, D: int):
    """(o_part, lse_part, split_done) from CuPy's pool on the current device and stream.

    The fp32 partials, and for the self-merging 16-row kernel (else None: the others never read it)
    one zeroed int32 counter per row group (y, z of the grid ``g``) that the split CTAs
    count themselves in; the last one merges the group and sets its counter back to 0, so a
    workspace kept for the next launch on the same stream needs no clearing. The pool is
    stream-ordered (a freed block is reused only behind the work of the stream it was allocated
    on), so the current stream must be the one the kernels run on.
    """
    cp = cupy()
    return (cp.empty((p.splits, B, Hq, Nq, D), dtype=cp.float32),
            cp.empty((p.splits, B, Hq, Nq), dtype=cp.float32),
            cp.zeros((g[1] * g[2],), dtype=cp.int32) if p.rows == SELF_MERGING_ROWS else None)


def ws_box_rows(mod, p: Plan) -> tuple[int, int, int]:
    """Box rows of the q, k and v tensor maps that a ``ws`` plan's kernel takes."""
    if p.headpair:
        return mod.fwd_split_headpair.box_rows()
    kv = mod.fwd_split.tma
    return (mod.split_pack_q_box if p.pack == WS_PACK else kv), kv, kv


def launch_kernels(mod, p: Plan, g: tuple, rows: int, params, stream=None, maps: tuple = ()) -> None:
    """The split kernel, then for 64 / 128 packed rows the merge of ``rows`` output rows, on ``stream``
    (anything with ``.ptr``; None: CuPy's current). A ``ws`` plan's ``mod`` is the sm90ws module, which
    takes the tensor maps (q, k, v) after the Params."""
    if p.ws:
        k = mod.split_entry(p.pack == WS_PACK, p.gated, keep=int(params["keep"]) != 0, head_pairs=p.headpair)
        k.fn(g, (k.threads, 1, 1), (params, *maps), shared_mem=k.smem, stream=stream)
    else:
        fn, threads, smem = mod.split[p.rows]
        fn(g, (threads, 1, 1), (params,), shared_mem=smem, stream=stream)
    if p.rows != SELF_MERGING_ROWS:
        w = mod.combine_warps
        mod.combine((-(-rows // w), 1, 1), (32 * w, 1, 1), (params,), stream=stream)


def launch(mod, frame, params_fields: dict, p: Plan, B: int, Nq: int, Hq: int, Hkv: int, D: int,
           pack_params, maps: tuple = ()) -> None:
    """The split kernels on CuPy's current stream; the fp32 partials and counters live for the call only."""
    g = grid(p, B, Nq, Hkv)
    # Call-local partials straight from CuPy's pool, sparing the caller's framework two allocations
    # and DLPack views.
    cp = cupy()
    with cp.cuda.Device(frame.device_id):
        o_part, lse_part, done = workspace(p, g, B, Nq, Hq, D)
    params = pack_params(**params_fields, o_part=o_part, lse_part=lse_part, split_done=done, num_splits=p.splits,
                         pack_heads=p.pack)
    launch_kernels(mod, p, g, B * Hq * Nq, params, maps=maps)
