"""Where each step of the head-pair consumers' key loop goes, from an instrumented build's SM clocks.

Usage (two steps, the first where git is, the second on the GPU machine):
  python bench/ab_sources.py expand . T.cu --patch bench/variants/headpair-step-trace.diff
  python bench/step_trace.py run T.cu OUT.npz [--n 16384] [--rhos 1 0.5 0.25 0]
      T.cu's bsfa_fwd_headpair in place of the library's, fp16, head dim 128, B=1, Hq=32, Hkv=8, causal, with
      thresholds keeping rho of the gated tiles (as `bsfa bench` sets them); per rho 20 untimed calls, then the
      trace buffer cleared and one call traced: per step of CTAs 0-7, both warpgroups, the clock before and after
      the step's K and V waits, once S is in, once the block is decided, once the previous block's P V retired,
      and at the step's end (the diff says which bits flag what)
  python bench/step_trace.py summary OUT.npz
      per rho and kind of block (kept, skipped, each after a kept or a skipped block), the mean cycles a
      warpgroup spends in the K and V waits (waits), from them to S in (S), deciding (gate), after the decision
      until the previous P V retired (rest: a kept block's softmax), from there to the step's end (tail: the V
      slot's release, O's rescale) and from the end to the next step (loop), each warpgroup's mean step, the
      share of time at the work tiles' seams, and how much the two warpgroups' S of the same block overlap.
The instrument costs time of its own (about 5 % of a call at 16K): read the split, not the absolute cycles.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SYMBOL = "bsfa_step_trace"
SHAPE = (8, 2, 2048, 6)  # CTAs, warpgroups, steps, clocks (the diff's bsfa_step_trace)
_CLOCK = (1 << 61) - 1
PARTS = ("waits", "S", "gate", "rest", "tail", "loop")
KINDS = ("kept", "skipped", "kept after kept", "kept after skipped", "skipped after kept", "skipped after skipped")


def summarize(trace: np.ndarray) -> dict:
    """Cycles per block of each part (PARTS) by kind (KINDS: kept or skipped, and each by whether the previous
    block of its tile was kept), their counts, each warpgroup's mean step, the share of all traced time spent
    between a work tile's last step and the next tile's first ("seams"), and the mean overlap of the two warpgroups'
    S windows of the same block, as a fraction of the shorter ("s_overlap"). A step's clocks: before its K and V
    waits, after them, S in, decided, the previous block's P V retired, the end; "loop" is the time from the end to
    the next step's first clock within a tile (a tile's first step counts as after a skipped block)."""
    if trace.shape[1:] != SHAPE[1:]:
        raise ValueError(f"trace: expected shape (CTAs, {', '.join(map(str, SHAPE[1:]))}), got {trace.shape}")
    sums = {k: dict.fromkeys(PARTS, 0) for k in KINDS}
    counts = dict.fromkeys(KINDS, 0)
    wg_time, wg_steps = [0, 0], [0, 0]
    seams = total = 0
    overlaps = []
    for cta in range(trace.shape[0]):
        steps = min(int((trace[cta, g, :, 0] != 0).sum()) for g in range(2))
        if steps < 2:
            continue
        t = [trace[cta, g, :steps].astype(np.uint64) for g in range(2)]
        for g in range(2):
            flags = (t[g][:, 5] >> np.uint64(61)).astype(np.int64)
            c = t[g].copy()
            c[:, 5] &= np.uint64(_CLOCK)
            c = c.astype(np.int64)
            kept, prev, first = (flags >> 2) & 1, (flags >> 1) & 1, flags & 1
            to_next = np.r_[c[1:, 0] - c[:-1, 5], 0]
            seam = np.r_[first[1:], 1] == 1  # the next step starts a tile (or there is none)
            parts = {"waits": c[:, 1] - c[:, 0], "S": c[:, 2] - c[:, 1], "gate": c[:, 3] - c[:, 2],
                     "rest": c[:, 4] - c[:, 3], "tail": c[:, 5] - c[:, 4], "loop": np.where(seam, 0, to_next)}
            sels = {"kept": kept == 1, "skipped": kept == 0}
            for k in ("kept", "skipped"):
                sels[f"{k} after kept"] = sels[k] & (prev == 1)
                sels[f"{k} after skipped"] = sels[k] & (prev == 0)
            for kind, sel in sels.items():
                counts[kind] += int(sel.sum())
                for name, v in parts.items():
                    sums[kind][name] += int(v[sel].sum())
            step_total = int(sum(v.sum() for v in parts.values()))
            wg_time[g] += step_total
            wg_steps[g] += steps
            seams += int(to_next[seam].sum())
            total += step_total + int(to_next[seam].sum())
        a = [x.astype(np.int64) for x in t]
        inter = np.clip(np.minimum(a[0][:, 2], a[1][:, 2]) - np.maximum(a[0][:, 1], a[1][:, 1]), 0, None)
        shorter = np.minimum(a[0][:, 2] - a[0][:, 1], a[1][:, 2] - a[1][:, 1])
        overlaps.append(inter / np.maximum(shorter, 1))
    out = {"counts": counts, "seams": seams / total if total else 0.0,
           "wg_step": [wg_time[g] / wg_steps[g] if wg_steps[g] else 0.0 for g in range(2)],
           "s_overlap": float(np.concatenate(overlaps).mean()) if overlaps else 0.0}
    for kind in sums:
        n = counts[kind]
        out[kind] = {name: (sums[kind][name] / n if n else 0.0) for name in PARTS}
    return out


def report(results: dict) -> list[str]:
    lines = []
    for label, s in results.items():
        lines.append(f"{label}: {s['counts']['kept']} kept and {s['counts']['skipped']} skipped warpgroup-blocks; "
                     f"tile seams {100 * s['seams']:.1f} % of the time; same-block S overlap {s['s_overlap']:.2f}; "
                     f"mean step of warpgroup 0 / 1 {s['wg_step'][0]:.0f} / {s['wg_step'][1]:.0f} cycles")
        for kind in KINDS:
            if s["counts"][kind]:
                step = sum(s[kind].values())
                lines.append(f"  {kind:21s} ({s['counts'][kind]:5d}) step {step:6.0f} cycles: " + "  ".join(
                    f"{name} {s[kind][name]:5.0f}" for name in PARTS))
    return lines


def run(source: str, out: str, n: int, rhos) -> None:
    import cupy as cp

    import bsfa_cupy
    from bsfa_cupy import ops
    from bsfa_cupy.tools.benchmark import thresholds_for_rho

    sys.path.insert(0, str(Path(__file__).parent))
    from ab_sources import headpair_build, load_build

    text = Path(source).read_text()
    real_get_module = ops.get_module
    built = {}

    def get_module(key, backend, dev):
        mod = real_get_module(key, backend, dev)
        if key.arch != "sm90ws":
            return mod
        if key not in built:
            raw = load_build(text, key, backend, dev, "step_trace")
            built[key] = (headpair_build(mod, raw), raw)
        return built[key][0]

    ops.get_module = get_module
    rng = cp.random.default_rng(0)
    q = rng.standard_normal((1, n, 32, 128), dtype=cp.float32).astype(cp.float16)
    k = rng.standard_normal((1, n, 8, 128), dtype=cp.float32).astype(cp.float16)
    v = rng.standard_normal((1, n, 8, 128), dtype=cp.float32).astype(cp.float16)
    tm = cp.from_dlpack(bsfa_cupy.block_max_scores(q, k))[0]
    traces = {}
    for rho in rhos:
        thr = bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm, rho, n))
        for _ in range(20):
            bsfa_cupy.attention(q, k, v, thr)
        raw = next(iter(built.values()))[1]
        ptr = raw.get_global_var(SYMBOL)
        ptr = ptr[0] if isinstance(ptr, tuple) else ptr
        buf = cp.ndarray(SHAPE, cp.uint64, cp.cuda.MemoryPointer(
            cp.cuda.UnownedMemory(ptr, int(np.prod(SHAPE)) * 8, raw), 0))
        buf.fill(0)
        bsfa_cupy.attention(q, k, v, thr)
        traces[f"rho{rho}"] = buf.get()
    np.savez_compressed(out, **traces)
    print("\n".join(report({key: summarize(t) for key, t in traces.items()})))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="trace on the GPU")
    r.add_argument("source")
    r.add_argument("out")
    r.add_argument("--n", type=int, default=16384)
    r.add_argument("--rhos", type=float, nargs="+", default=(1.0, 0.5, 0.25, 0.0))
    s = sub.add_parser("summary", help="summarise a saved trace")
    s.add_argument("trace")
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.n % 128 or args.n <= 0:
            p.error(f"--n: expected a positive multiple of 128, got {args.n}")
        bad = [r for r in args.rhos if not 0.0 <= r <= 1.0]
        if bad:
            p.error(f"--rhos: expected keep fractions in [0, 1], got {bad}")
        run(args.source, args.out, args.n, args.rhos)
    else:
        with np.load(args.trace) as f:
            print("\n".join(report({key: summarize(f[key]) for key in f.files})))


if __name__ == "__main__":
    main()
