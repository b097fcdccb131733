"""Decode and short chunks against a long K/V cache: split-KV bsfa vs SDPA, and the memory floor.

Usage: python bench/decode.py --out DIR [--shapes 1x32768 1x131072 16x131072 128x131072 1024x131072]
           [--rho 0.25] [--group-shared-q | --shared-q-sparse] [--flex] [--tag decode] [--dry-run]
B=1, Hq=32, Hkv=8, D=128, float16 by default. Per Nq x Nk shape (queries at the end of the keys: bottom-right
causal, which for Nq=1 is no mask at all):
  bsfa-auto         bsfa_cupy.attention, backend="auto" (the split-KV kernel where it routes there), dense
  bsfa-plan         bsfa_cupy.AttentionPlan of the same call, built once; plan.run timed (same kernel, less host)
  bsfa-splitkv      backend="splitkv" (the mma.sync split-KV family, heuristic splits), dense
  bsfa-unsplit      today's kernel (backend "sm90ws" on Hopper, else "sm80"), dense
  bsfa-ws-split     Hopper only: backend="sm90ws" with its split entry's heuristic num_splits, dense (auto's
                    route from 65 rows on; timed on every shape for the routing's A/B)
  bsfa-sparse       backend="auto" with thresholds keeping about --rho of the gated (off-diagonal) tiles,
                    per head and query tile, from bsfa_cupy.block_max_scores of the same inputs
  bsfa-sparse-plan  the same thresholds through an AttentionPlan
  bsfa-sparse-shared, bsfa-sparse-shared-plan
                    only with --shared-q-sparse: the two above with every query head of a GQA group given the
                    same q (one decision per group, so V is loaded for about rho of the gated tiles), timed in
                    the same run as the dense rows (whose time does not depend on q's values)
  sdpa-flash        SDPA's flash backend (Nq>1: torch.nn.attention.bias.causal_lower_right)
  sdpa-cudnn        SDPA's cuDNN backend (Nq>1: an explicit boolean bottom-right mask)
  sdpa-efficient    SDPA's memory-efficient backend (Nq>1: causal_lower_right)
  flex              FlexAttention with a bottom-right mask_mod (only with --flex: compiling takes a while)
and the memory floor: (K + V + Q + out bytes) / the HBM peak (--peak-tbs, default 4.8 TB/s, the H200's
HBM3e spec; --achievable-tbs, default 4.2 TB/s, a copy-kernel-class rate, gives the floor the bar is held
to). Writes
<GPU>_<date>_<tag>.{json,md,png} into --out and prints the split-KV bars, which take per shape the faster of
bsfa-auto and bsfa-plan (dense) and of bsfa-sparse and bsfa-sparse-plan, and name the one taken. --dry-run checks this script's
CPU-side logic (thresholds for a target rho, the tables) with random tile maxima and made-up timings.
--group-shared-q gives every row the shared q instead (the v14/v15 "shared-q" runs).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bsfa_reference / bsfa_cupy from a checkout

from bsfa_reference.tiles import BLOCK_M, BLOCK_N, diagonal_tiles, tile_positions  # noqa: E402


def parse_shape(text: str) -> tuple[int, int]:
    try:
        nq, nk = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NQxNK, e.g. 1x131072, got {text!r}") from None
    if nq < 1 or nk < nq:
        raise argparse.ArgumentTypeError(f"expected 1 <= NQ <= NK, got {text!r}")
    return nq, nk


def thresholds_for_rho(tile_max, rho: float, Nq: int, Nk: int, xp=np):
    """(Hq, T) float32 thresholds keeping, per head and query tile, the top ceil(rho * gated) tiles.

    tile_max: (Hq, nQ, nK) of one batch element. The queries sit at the end of the keys (bottom-right),
    so query tile a uses threshold position (Nk - Nq + 128a) // 128, which is where the value goes.
    """
    Hq, nQ, nK = tile_max.shape
    diag = xp.asarray(diagonal_tiles(Nq, Nk, BLOCK_M, BLOCK_N))
    gated = (tile_max > -xp.inf) & ~diag[None]
    vals = xp.where(gated, tile_max, -xp.inf)
    desc = -xp.sort(-vals, axis=-1)
    n_g = gated.sum(axis=-1)
    idx = xp.clip(xp.ceil(rho * n_g).astype(xp.int64) - 1, 0, nK - 1)
    thr_a = xp.take_along_axis(desc, idx[..., None], axis=-1)[..., 0]
    thr_a = xp.where(n_g > 0, thr_a, xp.inf)  # nothing gated: any value
    pos = np.maximum(tile_positions(Nq, Nk, BLOCK_M), 0)
    thr = xp.full((Hq, int(pos.max()) + 1), xp.inf, dtype=xp.float32)
    thr[:, xp.asarray(pos)] = thr_a.astype(xp.float32)
    return thr


def realised_rho(keep, tile_max, Nq: int, Nk: int, xp=np) -> float:
    """Kept share of the gated tiles (valid, off-diagonal)."""
    diag = xp.asarray(diagonal_tiles(Nq, Nk, BLOCK_M, BLOCK_N))
    gated = (tile_max > -xp.inf) & ~diag[None, None]
    return float((xp.asarray(keep) & gated).sum() / max(int(gated.sum()), 1))


def v_share(keep, tile_max, Nq: int, Nk: int, Hkv: int, xp=np) -> float:
    """Share of the gated (K/V head, tile) pairs whose V the split-KV kernel loads: a CTA packs the query
    heads of a GQA group and loads a tile's V when any of them keeps it, so with independent per-head
    decisions 1 - (1 - rho) ** G of them (0.68 for rho = 0.25, G = 4), not rho."""
    keep = xp.asarray(keep)
    B, Hq, nQ, nK = keep.shape
    diag = xp.asarray(diagonal_tiles(Nq, Nk, BLOCK_M, BLOCK_N))
    gated = (xp.asarray(tile_max) > -xp.inf) & ~diag[None, None]
    any_kept = (keep & gated).reshape(B, Hkv, Hq // Hkv, nQ, nK).any(axis=2)
    gated_kv = gated.reshape(B, Hkv, Hq // Hkv, nQ, nK).any(axis=2)
    return float(any_kept.sum() / max(int(gated_kv.sum()), 1))


def group_shared(q, G: int):
    """q (B, Nq, Hq, D) with every query head of a GQA group of G given the group's first head's q."""
    return q[:, :, ::G].repeat_interleave(G, dim=2).contiguous()


def floor_ms(B, Nq, Nk, Hq, Hkv, D, itemsize, tbs) -> float:
    bytes_moved = itemsize * D * (2 * B * Nk * Hkv + 2 * B * Nq * Hq)
    return bytes_moved / (tbs * 1e12) * 1e3


IMPLS = ("bsfa-auto", "bsfa-plan", "bsfa-splitkv", "bsfa-unsplit", "bsfa-ws-split", "bsfa-sparse", "bsfa-sparse-plan",
         "bsfa-sparse-shared", "bsfa-sparse-shared-plan", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
#: The bars' bsfa timings: the faster of each pair (attention per call, or a plan's run).
DENSE = ("bsfa-auto", "bsfa-plan")
SPARSE = ("bsfa-sparse", "bsfa-sparse-plan")
SPARSE_SHARED = ("bsfa-sparse-shared", "bsfa-sparse-shared-plan")


#: Dense fp16 tensor-core peak of an H200 / H100 SXM (TFLOP/s): the compute floor of the short-chunk rows.
TENSOR_PEAK_TFLOPS = 989.0


def compute_floor_ms(B, Nq, Nk, Hq, D) -> float:
    """QK^T and PV of Nq bottom-right causal rows against Nk keys at the tensor-core peak."""
    pairs = sum(Nk - Nq + 1 + i for i in range(Nq)) if Nq <= Nk else Nq * Nk
    return 4 * B * Hq * pairs * D / (TENSOR_PEAK_TFLOPS * 1e12) * 1e3


def bars(rows, achievable_tbs, *, b=1, hq=32, d=128) -> list[str]:
    """The split-KV bars, checked on the rows (PASS / FAIL / n/a lines).

    The memory-floor bar takes the floor at ``achievable_tbs`` (K+V bytes at 4.2 TB/s by default, as the
    bar is stated); where the tensor-core floor of the shape is above 1.5x that floor (128 rows against
    128K keys), the line says so: no kernel can meet it there."""
    by = {(r["nq"], r["nk"], r["impl"]): r for r in rows}
    shapes = sorted({(r["nq"], r["nk"]) for r in rows})
    out = []

    def ms(nq, nk, impl):
        r = by.get((nq, nk, impl))
        return None if r is None or r.get("ms") is None else r["ms"]

    def best(nq, nk, impls):
        timed = [(ms(nq, nk, i), i) for i in impls if ms(nq, nk, i) is not None]
        return min(timed) if timed else (None, None)

    for nq, nk in shapes:
        ours, which = best(nq, nk, DENSE)
        sdpa = [x for x in (ms(nq, nk, i) for i in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")) if x]
        peer = min(sdpa) if sdpa else None
        fl = next(r["floor_ach_ms"] for r in rows if (r["nq"], r["nk"]) == (nq, nk))
        tag = f"{nq}x{nk}"

        def line(ok, text):
            out.append(f"{'n/a ' if ok is None else ('PASS' if ok else 'FAIL')} {tag}: {text}")

        if ours is None:
            line(None, "neither bsfa-auto nor bsfa-plan has a timing")
            continue
        if nq == 1:
            line(None if peer is None else ours <= 1.1 * peer,
                 f"dense {ours:.3f} ms ({which}) <= 1.1 x best SDPA ({'-' if peer is None else f'{peer:.3f}'} ms)")
        if nq <= 128:
            cf = compute_floor_ms(b, nq, nk, hq, d)
            reach = "" if cf <= 1.5 * fl else (f"; the tensor-core floor alone is {cf:.3f} ms at "
                                                f"{TENSOR_PEAK_TFLOPS:.0f} TFLOP/s, out of reach of any kernel")
            line(ours <= 1.5 * fl,
                 f"dense {ours:.3f} ms ({which}) <= 1.5 x memory floor at {achievable_tbs} TB/s ({fl:.3f} ms){reach}")
            sp, sp_which = best(nq, nk, SPARSE)
            line(None if sp is None else ours >= 1.3 * sp,
                 f"sparse (rho~0.25) {'-' if sp is None else f'{sp:.3f}'} ms ({sp_which or '-'}) at least 1.3x faster "
                 f"than dense {ours:.3f} ms ({which})")
            sh, sh_which = best(nq, nk, SPARSE_SHARED)
            if sh is not None:
                line(ours >= 1.3 * sh, f"sparse, one decision per GQA group (rho~0.25) {sh:.3f} ms ({sh_which}) at "
                                       f"least 1.3x faster than dense {ours:.3f} ms ({which})")
        else:
            line(None if peer is None else peer / ours >= 0.9,
                 f"dense {ours:.3f} ms ({which}) vs the best SDPA/flex (cuDNN class) "
                 f"{'-' if peer is None else f'{peer:.3f}'} ms: speed ratio >= 0.9")
    return out


def markdown(result) -> str:
    rows = result["rows"]
    lines = [f"# Decode / short chunks vs long K/V: {result['gpu']}, {result['date']}", "",
             f"B={result['b']}, Hq={result['hq']}, Hkv={result['hkv']}, D={result['d']}, {result['dtype']}; "
             f"queries at the end of the keys (bottom-right causal). Memory floor: K+V+Q+out bytes at "
             f"{result['peak_tbs']} TB/s (HBM peak) and at {result['achievable_tbs']} TB/s. ρ = kept share of "
             "the gated tiles." + (" The query heads of each GQA group share one q (--group-shared-q), so they "
                                    "keep the same tiles." if result.get("group_shared_q") else "")
             + (" The bsfa-sparse-shared rows give the query heads of each GQA group one q (--shared-q-sparse), "
                "so they keep the same tiles." if result.get("shared_q_sparse") else ""), "",
             "| Nq x Nk | impl | ms | x floor (peak) | x floor (achievable) | ρ | splits | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("ms") is None:
            lines.append(f"| {r['nq']}x{r['nk']} | {r['impl']} | - | | | | | {r.get('error') or ''} |")
            continue
        rho = "" if r.get("rho") is None else f"{r['rho']:.3f}"
        sp = "" if r.get("splits") is None else str(r["splits"])
        note = "" if r.get("v_share") is None else f"V loaded for {r['v_share']:.3f} of the gated tiles"
        lines.append(f"| {r['nq']}x{r['nk']} | {r['impl']} | {r['ms']:.4f} | {r['ms'] / r['floor_ms']:.2f} | "
                     f"{r['ms'] / r['floor_ach_ms']:.2f} | {rho} | {sp} | {note} |")
    lines += ["", "## Split-KV bars", "",
              "Each bar takes the faster of bsfa-auto (`attention` per call) and bsfa-plan (`AttentionPlan.run`) for "
              "dense, and of bsfa-sparse and bsfa-sparse-plan for sparse (and of the -shared pair); the one taken is "
              "named in brackets.", ""]
    lines += [f"- {b}" for b in result["bars"]] + [""]
    return "\n".join(lines)


def plot(result, stem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("ms") is not None]
    shapes = sorted({(r["nq"], r["nk"]) for r in result["rows"]})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes)), 4))
    w = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        ys = []
        for s in shapes:
            r = next((r for r in rows if (r["nq"], r["nk"]) == s and r["impl"] == impl), None)
            ys.append(np.nan if r is None else r["ms"] / r["floor_ms"])
        ax.bar(np.arange(len(shapes)) + j * w, ys, w, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(shapes)) + 0.4 - w / 2, [f"{a}x{b}" for a, b in shapes])
    ax.set_ylabel(f"time / memory floor ({result['peak_tbs']} TB/s)")
    ax.set_title(f"{result['gpu']}: Nq x Nk, Hq={result['hq']} Hkv={result['hkv']} D={result['d']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [Path(path)]


def _sdpa_fn(name, q, k, v, Nq, Nk):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, N, D) views
    gqa = q.shape[2] != k.shape[2]
    if Nq == 1:
        mask = None  # the last row sees every key
    elif name == "sdpa-cudnn":
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        mask = j <= i + (Nk - Nq)  # bottom-right, True = attend
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(Nq, Nk)

    def fn():
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)

    with sdpa_kernel(backend):
        fn()  # raises if the backend refuses this shape
    # The backend is picked once around the timing, not per call: entering sdpa_kernel costs host
    # time that would make a 40 us decode call host-bound.
    return fn, lambda: sdpa_kernel(backend)


def _flex_fn(q, k, v, Nq, Nk):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    shift = Nk - Nq
    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + shift, None, None, Nq, Nk)
    flex = torch.compile(flex_attention)

    def fn():
        return flex(qt, kt, vt, block_mask=mask, enable_gqa=qt.shape[1] != kt.shape[1])

    fn()
    return fn


def run_gpu(args) -> dict:
    import cupy as cp
    import torch

    import bsfa_cupy
    from bsfa_cupy import _splitkv
    from bsfa_cupy._kernels import compute_capability, sm_count
    from bsfa_cupy.tools.benchmark import Timer, _warm_up_clocks, gpu_name

    torch.manual_seed(0)
    timer = Timer(args.repeats, args.inner)
    tdt = getattr(torch, args.dtype)
    B, Hq, Hkv, D = args.b, args.hq, args.hkv, args.d
    unsplit = "sm90ws" if compute_capability(torch.cuda.current_device()) == "90" else "sm80"
    sms = sm_count(torch.cuda.current_device())
    _warm_up_clocks()
    rows = []
    for Nq, Nk in args.shapes:
        base = dict(nq=Nq, nk=Nk, floor_ms=floor_ms(B, Nq, Nk, Hq, Hkv, D, 2, args.peak_tbs),
                    floor_ach_ms=floor_ms(B, Nq, Nk, Hq, Hkv, D, 2, args.achievable_tbs))

        def add(impl, ms=None, error=None, **kw):
            row = dict(impl=impl, ms=ms, error=error, **base, **kw)
            rows.append(row)
            val = error if ms is None else f"{ms:.4f} ms = {ms / base['floor_ms']:.2f} x floor"
            print(f"{Nq:5d}x{Nk:<7d} {impl:15s} {val}" + (f" rho={kw['rho']:.3f}" if kw.get("rho") is not None else ""),
                  flush=True)

        q = torch.randn(B, Nq, Hq, D, device="cuda", dtype=tdt)
        if args.group_shared_q:  # every query head of a GQA group the same: one decision per group
            q = group_shared(q, Hq // Hkv)
        k = torch.randn(B, Nk, Hkv, D, device="cuda", dtype=tdt)
        v = torch.randn(B, Nk, Hkv, D, device="cuda", dtype=tdt)
        plan = _splitkv.plan(B, Nq, Nk, Hq, Hkv, sms)
        routed = _splitkv.wanted("auto", None, B, Nq, Nk, Hq, D, sms)
        ws_route = routed and _splitkv.ws_wanted("auto", Nq, Hq // Hkv, unsplit == "sm90ws")
        ws_plan = _splitkv.plan(B, Nq, Nk, Hq, Hkv, sms, ws=True)
        auto_plan = ws_plan if ws_route else plan
        sparse_splits = _splitkv.plan(B, Nq, Nk, Hq, Hkv, sms, gated=True, ws=ws_route).splits
        # the Hopper kernel's split entry on every shape, routed there or not (the routing's A/B)
        impls = [("bsfa-auto", "auto", auto_plan.splits if routed else None), ("bsfa-splitkv", "splitkv", plan.splits),
                 ("bsfa-unsplit", unsplit, None)]
        if unsplit == "sm90ws":
            impls.append(("bsfa-ws-split", "sm90ws", ws_plan.splits))
        with torch.inference_mode():
            for impl, be, splits in impls:
                try:
                    ns = splits if impl == "bsfa-ws-split" else None
                    add(impl, ms=timer(lambda i, be=be, ns=ns: bsfa_cupy.attention(q, k, v, backend=be, num_splits=ns),
                                       1), splits=splits)
                except Exception as exc:  # a result, not a crash
                    add(impl, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
            try:
                dense_plan = bsfa_cupy.AttentionPlan(q, k, v)
                add("bsfa-plan", ms=timer(lambda i: dense_plan.run(q, k, v), 1),
                    splits=None if dense_plan.split is None else dense_plan.split.splits)
            except Exception as exc:
                add("bsfa-plan", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
            def time_sparse(qx, names):
                thr = rho = vsh = None
                try:
                    tm = cp.from_dlpack(bsfa_cupy.block_max_scores(qx, k))
                    thr = bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm[0], args.rho, Nq, Nk, xp=cp))
                    _, keep = bsfa_cupy.attention(qx, k, v, thr, return_keep=True)
                    rho = realised_rho(cp.from_dlpack(keep), tm, Nq, Nk, xp=cp)
                    vsh = v_share(cp.from_dlpack(keep), tm, Nq, Nk, Hkv, xp=cp)
                    add(names[0], ms=timer(lambda i: bsfa_cupy.attention(qx, k, v, thr), 1), rho=rho, v_share=vsh,
                        rho_target=args.rho, splits=sparse_splits if routed else None)
                except Exception as exc:
                    add(names[0], error=f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
                try:
                    if thr is None:
                        raise RuntimeError(f"no thresholds ({names[0]} failed)")
                    sparse_plan = bsfa_cupy.AttentionPlan(qx, k, v, thr)
                    add(names[1], ms=timer(lambda i: sparse_plan.run(qx, k, v), 1), rho=rho, v_share=vsh,
                        rho_target=args.rho, splits=None if sparse_plan.split is None else sparse_plan.split.splits)
                except Exception as exc:
                    add(names[1], error=f"{type(exc).__name__}: {exc}".splitlines()[0][:160])

            time_sparse(q, SPARSE)
            if args.shared_q_sparse:
                time_sparse(group_shared(q, Hq // Hkv), SPARSE_SHARED)
            peers = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"] + (["flex"] if args.flex else [])
            for peer in peers:
                try:
                    if peer == "flex":
                        fn, ctx = _flex_fn(q, k, v, Nq, Nk), contextlib.nullcontext
                    else:
                        fn, ctx = _sdpa_fn(peer, q, k, v, Nq, Nk)
                    with ctx():
                        add(peer, ms=timer(lambda i: fn(), 1))
                except Exception as exc:
                    add(peer, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
        q = k = v = None  # free the inputs before the next shape's
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()
    return dict(gpu=gpu_name(), rows=rows, sms=sms)


def run_dry(args) -> dict:
    """CPU only: random tile maxima through the threshold and rho logic, made-up timings."""
    rng = np.random.default_rng(0)
    rows = []
    for Nq, Nk in args.shapes:
        Nk_small = min(Nk, 4096)  # the logic is the same; keep it quick
        nQ, nK = -(-Nq // BLOCK_M), -(-Nk_small // BLOCK_N)
        from bsfa_reference.tiles import candidate_tiles

        valid = candidate_tiles(Nq, Nk_small, BLOCK_M, BLOCK_N, True)
        tm = np.where(valid[None], rng.standard_normal((args.hq, nQ, nK)), -np.inf)
        def thr_for(t):
            return thresholds_for_rho(t, args.rho, Nq, Nk_small)

        thr = thr_for(tm)
        pos = np.clip(tile_positions(Nq, Nk_small, BLOCK_M), 0, thr.shape[1] - 1)
        diag = diagonal_tiles(Nq, Nk_small, BLOCK_M, BLOCK_N)
        keep = (tm >= thr[:, pos][..., None]) | (diag[None] & valid[None])
        rho = realised_rho(keep[None], tm[None], Nq, Nk_small)
        assert abs(rho - args.rho) < 0.1 or nK < 8, (Nq, Nk_small, rho)
        vsh = v_share(keep[None], tm[None], Nq, Nk_small, args.hkv)
        assert rho - 1e-9 <= vsh <= 1 - (1 - rho) ** (args.hq // args.hkv) + 0.1, (rho, vsh)
        fl = floor_ms(args.b, Nq, Nk, args.hq, args.hkv, args.d, 2, args.peak_tbs)
        fa = floor_ms(args.b, Nq, Nk, args.hq, args.hkv, args.d, 2, args.achievable_tbs)
        for impl, f in (("bsfa-auto", 1.4), ("bsfa-plan", 1.25), ("bsfa-sparse", 0.9), ("bsfa-sparse-plan", 0.8),
                        ("sdpa-flash", 1.3), ("sdpa-cudnn", 1.2)):
            rows.append(dict(impl=impl, ms=f * fl, error=None, nq=Nq, nk=Nk, floor_ms=fl, floor_ach_ms=fa,
                             rho=rho if impl in SPARSE else None, v_share=vsh if impl in SPARSE else None))
        if args.shared_q_sparse:  # one decision per group: the tile maxima of a group's first head for all
            G = args.hq // args.hkv
            tm_s = np.repeat(tm[::G], G, axis=0)
            keep_s = (tm_s >= thr_for(tm_s)[:, pos][..., None]) | (diag[None] & valid[None])
            vsh_s = v_share(keep_s[None], tm_s[None], Nq, Nk_small, args.hkv)
            assert abs(vsh_s - realised_rho(keep_s[None], tm_s[None], Nq, Nk_small)) < 1e-9, vsh_s
            for impl, f in (("bsfa-sparse-shared", 0.75), ("bsfa-sparse-shared-plan", 0.7)):
                rows.append(dict(impl=impl, ms=f * fl, error=None, nq=Nq, nk=Nk, floor_ms=fl, floor_ach_ms=fa,
                                 rho=realised_rho(keep_s[None], tm_s[None], Nq, Nk_small), v_share=vsh_s))
        rows.append(dict(impl="flex", ms=None, error="dry run", nq=Nq, nk=Nk, floor_ms=fl, floor_ach_ms=fa))
        print(f"dry {Nq}x{Nk} (logic at Nk={Nk_small}): realised rho {rho:.3f}")
    return dict(gpu="dry-run", rows=rows, sms=None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=parse_shape, nargs="+",
                   default=[parse_shape(s) for s in ("1x32768", "1x131072", "16x131072", "128x131072", "1024x131072")])
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--d", type=int, default=128, choices=(64, 128))
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--rho", type=float, default=0.25, help="target kept share of the gated tiles")
    p.add_argument("--group-shared-q", action="store_true",
                   help="the query heads of each GQA group get the same q, so they keep the same tiles and the "
                        "V share of the sparse rows is rho itself (the best case for a GQA-packed CTA)")
    p.add_argument("--shared-q-sparse", action="store_true",
                   help="also time the sparse call with the query heads of each GQA group given one q "
                        "(bsfa-sparse-shared rows), in the same run as the dense rows")
    p.add_argument("--peak-tbs", type=float, default=4.8, help="HBM peak for the floor (H200: 4.8 TB/s)")
    p.add_argument("--achievable-tbs", type=float, default=4.2, help="a second floor at an achievable rate")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=5, help="calls per timed repeat")
    p.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles per shape)")
    p.add_argument("--out", default=".")
    p.add_argument("--tag", default="decode")
    p.add_argument("--dry-run", action="store_true", help="CPU-only check of this script's logic")
    args = p.parse_args(argv)
    if args.group_shared_q and args.shared_q_sparse:
        p.error("--group-shared-q gives every row the shared q already; --shared-q-sparse adds shared-q sparse rows "
                "to a run with independent q: take one")

    from bsfa_cupy.tools.outputs import check_out_dir, check_tag, result_stem, slug, write_result_files

    check_tag(args.tag)
    check_out_dir(args.out)
    res = run_dry(args) if args.dry_run else run_gpu(args)
    date = _dt.date.today().isoformat()
    result = dict(date=date, b=args.b, hq=args.hq, hkv=args.hkv, d=args.d, dtype=args.dtype, rho_target=args.rho,
                  group_shared_q=args.group_shared_q, shared_q_sparse=args.shared_q_sparse,
                  peak_tbs=args.peak_tbs, achievable_tbs=args.achievable_tbs, **res)
    result["bars"] = bars(result["rows"], args.achievable_tbs, b=args.b, hq=args.hq, d=args.d)
    for b in result["bars"]:
        print(b)
    stem = result_stem(slug(result["gpu"]), date, tag=args.tag)
    paths = write_result_files(args.out, stem, result, markdown(result), lambda s: plot(result, s))
    print("wrote " + ", ".join(str(x) for x in paths))


if __name__ == "__main__":
    main()
