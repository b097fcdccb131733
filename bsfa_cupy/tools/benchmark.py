"""Benchmark harness: our kernel (dense, sparse at target keep fractions, calibrated) and the peers.

Everything of one invocation runs in one process on one GPU, timed with CUDA events on torch's
current stream (our kernel launches there when handed torch tensors): warm-up first, then the
median over repeats of a back-to-back batch of calls that rotates between input sets so repeats do
not find their inputs in L2. The implementations of one shape take their repeats in turn (ours
dense, block_max, sparse per keep fraction, then each peer, and again), so that a drift of clocks
or temperature over the shape's timings falls on all of them alike, and the turn order is rotated by
one every repeat. A call right after a hotter one runs up to ~9 % slower on an H200, and the
effect fades over the next 50-90 ms (NOTES v27, v32). Rotating a cyclic order does not change
which implementation precedes which, so each takes untimed calls of its own right before its
timed batch: at least ``warmup`` of them, and at least ``warmup_ms`` of them by its call time.
Every implementation is then timed in its own steady state, which under sustained load is the
card's power cap. TFLOP/s always use
the dense-equivalent FLOPs (causal 2·B·Hq·N²·D, non-causal twice that), so sparse rows show
effective throughput.
"""
from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .outputs import check_out_dir, check_tag, result_stem, slug, write_result_files
from .progress import progress as progress_bar

IMPLS = ("bsfa-dense", "bsfa-sparse", "bsfa-calibrated", "bsfa-blockmax", "sdpa-flash", "sdpa-cudnn",
         "sdpa-efficient", "flex")
RHOS = (1.0, 0.5, 0.25, 0.1, 0.05)


@dataclass
class Row:
    impl: str
    b: int
    n: int
    d: int
    hq: int
    hkv: int
    dtype: str
    causal: bool
    rho: float | None = None
    rho_target: float | None = None
    ms: float | None = None
    tflops: float | None = None
    error: str | None = None


@dataclass
class Config:
    ns: tuple = (4096, 8192, 16384, 32768, 65536, 131072)
    ds: tuple = (64, 128)
    hkvs: tuple = (8, 32)
    dtypes: tuple = ("float16", "bfloat16")
    hq: int = 32
    b: int = 1
    causal: tuple = (True,)
    rhos: tuple = RHOS
    peers: tuple = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
    calibrated: bool = True
    blockmax: bool = True
    repeats: int = 7
    inner: int = 4
    warmup: int = 2  # untimed calls of an implementation right before each of its timed batches, at least
    warmup_ms: float = 100.0  # and at least this long by the implementation's own call time
    calib_k: int = 64
    ours: bool = True
    backend: str = "auto"  # our kernel: "auto", "sm80", "sm90" or "sm90ws"
    extra: dict = field(default_factory=dict)


def dense_flops(b, hq, n, d, causal):
    return (2 if causal else 4) * b * hq * n * n * d


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


class Timer:
    """Median ms per call of fn(i) (i rotates over input sets) on torch's current stream; each timed batch
    of ``inner`` calls comes right after untimed calls of the same fn (on the input sets before the
    batch's), so that no timed call follows another implementation's: ``warmup`` of them, or as many
    as take ``warmup_ms`` at the fn's call time (timed once, on ``clock``) where that is more, up to
    ``MAX_LEAD``."""

    MAX_LEAD = 1000

    def __init__(self, repeats, inner, warmup=2, warmup_ms=100.0, clock=time.perf_counter):
        if warmup < 0:
            raise ValueError(f"warmup: expected a count of calls >= 0, got {warmup}")
        if not warmup_ms >= 0:
            raise ValueError(f"warmup_ms: expected a time >= 0, got {warmup_ms}")
        self.repeats, self.inner, self.warmup, self.warmup_ms, self.clock = repeats, inner, warmup, warmup_ms, clock

    def lead_calls(self, call_ms: float) -> int:
        """Untimed calls before each timed batch of a fn that takes call_ms a call."""
        if self.warmup_ms == 0:
            return self.warmup
        by_time = math.ceil(self.warmup_ms / max(call_ms, 1e-3))
        return max(self.warmup, min(self.MAX_LEAD, by_time))

    def lead_for(self, fn, n_sets) -> int:
        """lead_calls at fn's call time: a first call (which compiles and plans), then one timed."""
        import torch

        fn(0)
        torch.cuda.synchronize()
        t0 = self.clock()
        fn(1 % n_sets)
        torch.cuda.synchronize()
        return self.lead_calls((self.clock() - t0) * 1e3)

    def __call__(self, fn, n_sets):
        got = self.many({"fn": fn}, n_sets)["fn"]
        if isinstance(got, BaseException):
            raise got
        return got

    def many(self, fns: dict, n_sets: int) -> dict:
        """Median ms per callable(i) of ``fns``, their repeats interleaved; a callable that raises gets
        its exception instead and takes no further turns."""
        import torch

        out: dict = {}
        live, lead = {}, {}
        for name, fn in fns.items():
            try:
                lead[name] = self.lead_for(fn, n_sets)
                live[name] = fn
            except Exception as exc:  # noqa: BLE001 -- reported per implementation
                out[name] = exc
        torch.cuda.synchronize()
        times: dict = {name: [] for name in live}
        for r in range(self.repeats):
            turn = list(live.items())
            k = r % len(turn) if turn else 0
            for name, fn in turn[k:] + turn[:k]:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                try:
                    for i in range(-lead[name], 0):
                        fn((r * self.inner + i) % n_sets)
                    start.record()
                    for i in range(self.inner):
                        fn((r * self.inner + i) % n_sets)
                    stop.record()
                    stop.synchronize()
                except Exception as exc:  # noqa: BLE001
                    out[name] = exc
                    del live[name]
                    torch.cuda.synchronize()
                    continue
                times[name].append(start.elapsed_time(stop) / self.inner)
        out.update({name: float(np.median(times[name])) for name in live})
        return {name: out[name] for name in fns}


def _input_sets(b, n, hq, hkv, d, dtype, l2_bytes):
    import torch

    tdt = getattr(torch, dtype)
    per_set = 2 * (b * n * hq * d + 2 * b * n * hkv * d)
    n_sets = max(1, min(4, math.ceil(3 * l2_bytes / per_set)))
    sets = []
    for _ in range(n_sets):
        q = torch.randn(b, n, hq, d, device="cuda", dtype=tdt)
        k = torch.randn(b, n, hkv, d, device="cuda", dtype=tdt)
        v = torch.randn(b, n, hkv, d, device="cuda", dtype=tdt)
        sets.append((q, k, v))
    return sets


def thresholds_for_rho(tile_max, rho, n):
    """(Hq, nQ) float32 on the device: per head and query tile, keep the top ceil(rho * gated) tiles.

    tile_max: (Hq, nQ, nK) device array of one batch element (Nq = Nk = n, so position = tile index).
    """
    import cupy as cp

    from bsfa_reference.tiles import diagonal_tiles

    diag = cp.asarray(diagonal_tiles(n, n, 128, 64))
    gated = (tile_max > -cp.inf) & ~diag[None]
    vals = cp.where(gated, tile_max, -cp.inf)
    desc = -cp.sort(-vals, axis=-1)
    n_g = gated.sum(axis=-1)
    idx = cp.clip(cp.ceil(rho * n_g).astype(cp.int64) - 1, 0, desc.shape[-1] - 1)
    thr = cp.take_along_axis(desc, idx[..., None], axis=-1)[..., 0]
    return cp.where(n_g > 0, thr, -cp.inf).astype(cp.float32)


def realised_rho(keep, n):
    import cupy as cp

    from .tiles import causal_tiles

    gated = causal_tiles(n, 128, 64)[1]
    g = cp.asarray(gated)[None, None]
    return float((cp.asarray(keep) & g).sum() / max(int(g.sum()) * keep.shape[0] * keep.shape[1], 1))


def _peer_fns(name, sets, causal, n):
    """A callable(i) for a torch peer, or raise with a short reason."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tsets = [tuple(x.transpose(1, 2) for x in s) for s in sets]  # (B, H, N, D) views
    gqa = sets[0][0].shape[2] != sets[0][1].shape[2]
    if name.startswith("sdpa-"):
        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

        def fn(i):
            q, k, v = tsets[i]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        fn(0)  # raises if the backend refuses this shape
        return fn
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, n, n) if causal else None

        def fn(i):
            q, k, v = tsets[i]
            return flex(q, k, v, block_mask=mask, enable_gqa=gqa)

        fn(0)
        return fn
    raise ValueError(name)


def run(cfg: Config, *, progress=True, echo=print, out_dir=".", tag="") -> dict:
    """Time every configured shape; writes JSON/markdown/PNG to ``out_dir`` unless it is None."""
    if out_dir:
        check_out_dir(out_dir)
        check_tag(tag, "tag")  # fails here, not after the timings
    import cupy as cp
    import torch

    import bsfa_cupy

    from .synthetic import make_sample

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    timer = Timer(cfg.repeats, cfg.inner, cfg.warmup, cfg.warmup_ms)
    _warm_up_clocks()
    rows: list[Row] = []
    combos = [(dt, d, hkv, c, n) for dt in cfg.dtypes for d in cfg.ds for hkv in cfg.hkvs for c in cfg.causal
              for n in cfg.ns]
    for dtype, d, hkv, causal, n in progress_bar(combos, "bench", progress):
        base = dict(b=cfg.b, n=n, d=d, hq=cfg.hq, hkv=hkv, dtype=dtype, causal=causal)
        flops = dense_flops(cfg.b, cfg.hq, n, d, causal)

        def add(impl, ms=None, error=None, **kw):
            tf = None if ms is None else flops / (ms * 1e-3) / 1e12
            row = Row(impl, **base, ms=ms, tflops=tf, error=error, **kw)
            rows.append(row)
            if not progress:
                echo(_fmt(row))

        try:
            sets = _input_sets(cfg.b, n, cfg.hq, hkv, d, dtype, l2)
        except torch.OutOfMemoryError:
            add("bsfa-dense", error="out of memory (inputs)")
            torch.cuda.empty_cache()
            continue
        try:
            with torch.inference_mode():
                # (label, impl, callable(i), extra row fields), timed together, repeats interleaved
                entries = _ours_entries(cfg, sets, n, causal, bsfa_cupy, cp) if cfg.ours else []
                for peer in cfg.peers:
                    try:
                        entries.append((peer, peer, _peer_fns(peer, sets, causal, n), {}))
                    except torch.OutOfMemoryError:
                        add(peer, error="out of memory")
                    except Exception as exc:  # a peer refusing a shape is a result, not a crash
                        add(peer, error=_short(exc))
                got = timer.many({label: fn for label, _, fn, _ in entries}, len(sets))
                for label, impl, _, kw in entries:
                    res = got[label]
                    if isinstance(res, torch.OutOfMemoryError):
                        add(impl, error="out of memory", **kw)
                    elif isinstance(res, BaseException):
                        add(impl, error=_short(res), **kw)
                    else:
                        add(impl, ms=res, **kw)
                if cfg.ours and cfg.calibrated and causal:
                    _bench_calibrated(cfg, sets, n, d, hkv, dtype, timer, add, bsfa_cupy, cp, make_sample)
        except torch.OutOfMemoryError:
            add("bsfa-dense", error="out of memory")
        del sets
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()

    result = {"gpu": gpu_name(), "date": _dt.date.today().isoformat(), "backend": cfg.backend,
              "timing": {"repeats": cfg.repeats, "inner": cfg.inner, "warmup": cfg.warmup,
                             "warmup_ms": cfg.warmup_ms},
              "rows": [asdict(r) for r in rows]}
    if out_dir:
        write_results(result, out_dir, tag)
    return result


def _warm_up_clocks(seconds=1.0):
    """Keep the GPU busy briefly before the first timing: the first shape of a run otherwise meets a
    card still raising its clocks (seen as an fp16 N=4K outlier in the 2026-11-27 H200 sweep)."""
    import time

    import torch

    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()


def _ours_entries(cfg, sets, n, causal, bsfa_cupy, cp):
    be = cfg.backend
    entries = [("bsfa-dense", "bsfa-dense", lambda i: bsfa_cupy.attention(*sets[i], causal=causal, backend=be), {})]
    if cfg.blockmax:
        entries.append(("bsfa-blockmax", "bsfa-blockmax",
                        lambda i: bsfa_cupy.block_max_scores(*sets[i][:2], causal=causal, backend=be), {}))
    if not causal:
        return entries
    tile_max = [cp.from_dlpack(bsfa_cupy.block_max_scores(q, k, backend=be))[0] for q, k, _ in sets]
    for rho in cfg.rhos:
        # Validated once, as a per-layer loop would hold them: no NaN check (a stream wait) per call.
        thr = [bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm, rho, n)) for tm in tile_max]
        _, keep = bsfa_cupy.attention(*sets[0], thr[0], return_keep=True, backend=be)
        got = realised_rho(cp.from_dlpack(keep), n)
        entries.append((f"bsfa-sparse@{rho}", "bsfa-sparse",
                        lambda i, thr=thr: bsfa_cupy.attention(*sets[i], thr[i], backend=be),
                        dict(rho=got, rho_target=rho)))
    return entries


def _bench_calibrated(cfg, sets, n, d, hkv, dtype, timer, add, bsfa_cupy, cp, make_sample):
    """Thresholds calibrated on two structured synthetic samples, timed on a fresh one."""
    import torch

    def sample(seed):
        s = make_sample(n, hq=cfg.hq, hkv=hkv, d=d, seed=seed, xp=cp)
        conv = lambda x: torch.from_dlpack(x.astype(dtype))  # noqa: E731
        return conv(s.q), conv(s.k), conv(s.v)

    cal = bsfa_cupy.Calibrator([cfg.calib_k])
    for seed in (1001, 1002):
        q, k, _ = sample(seed)
        cal.update(q, k)
    thr = bsfa_cupy.DeviceThresholds(cal.thresholds()[0])
    q, k, v = sample(2024)
    _, keep = bsfa_cupy.attention(q, k, v, thr, return_keep=True, backend=cfg.backend)
    got = realised_rho(cp.from_dlpack(keep), n)
    add("bsfa-calibrated", ms=timer(lambda i: bsfa_cupy.attention(q, k, v, thr, backend=cfg.backend), 1), rho=got)


def _short(exc) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:160]


def _fmt(r: Row) -> str:
    rho = "" if r.rho is None else f" rho={r.rho:.3f}"
    val = r.error if r.error else f"{r.ms:.3f} ms {r.tflops:.0f} TFLOP/s"
    return f"{r.impl:16s} {r.dtype:8s} d={r.d} hkv={r.hkv} n={r.n:6d} causal={int(r.causal)}{rho}: {val}"


def write_results(result: dict, out_dir=".", tag="") -> list[Path]:
    def plot(stem):
        from .plots import bench_plots

        return bench_plots(result, stem)

    return write_result_files(out_dir, result_stem(slug(result["gpu"]), result["date"], tag=tag), result,
                              markdown(result), plot)



def markdown(result: dict) -> str:
    """Per shape: TFLOP/s of each implementation, ratios to our dense and to SDPA flash."""
    rows = result["rows"]
    lines = [f"# Benchmark on {result['gpu']}, {result['date']}", "",
             "Dense-equivalent TFLOP/s (causal 2·B·Hq·N²·D). ρ = realised keep fraction of the gated tiles. "
             "`×dense` = our dense time / this time; `×flash` = SDPA flash time / this time.", ""]
    keyf = lambda r: (r["dtype"], r["d"], r["hkv"], r["causal"], r["n"])  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(keyf(r), []).append(r)
    lines.append("| dtype | D | Hkv | causal | N | impl | ρ target | ρ | ms | TFLOP/s | ×dense | ×flash | ×cudnn |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, grp in sorted(groups.items()):
        ref_ms = {r["impl"]: r["ms"] for r in grp if r["rho_target"] is None and r["ms"]}
        for r in grp:
            ms = r["ms"]
            ratio = lambda name: "" if not (ms and ref_ms.get(name)) else f"{ref_ms[name] / ms:.2f}"  # noqa: E731
            cells = [r["dtype"], r["d"], r["hkv"], r["causal"], r["n"], r["impl"],
                     "" if r["rho_target"] is None else r["rho_target"],
                     "" if r["rho"] is None else f"{r['rho']:.3f}",
                     r["error"] or f"{ms:.3f}", "" if r["tflops"] is None else f"{r['tflops']:.0f}",
                     ratio("bsfa-dense"), ratio("sdpa-flash"), ratio("sdpa-cudnn")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
