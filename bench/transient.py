"""How long a call runs slow after a hotter one: per-call times of one implementation right after a burst of another.

Usage: python bench/transient.py [--n 16384] [--burst-ms 300] [--follow-ms 300] [--trials 3] [--tag T] [--out DIR]

B=1, Hq=32, Hkv=8, D=128, float16, causal, one input set (as `bsfa bench` has at N >= 16K). For every pair
(predecessor, follower) of: our block_max_scores (the hottest call, ~1500 dense-equivalent TFLOP/s), torch SDPA's
cuDNN backend, our dense call, and our calls with thresholds at rho ~0.5 and ~0.1 of the gated tiles, the
predecessor runs back to back for --burst-ms, then the follower for --follow-ms, every follower call between its own
pair of CUDA events; per trial the GPU idles 0.3 s first. Writes, per pair, the median over trials of each follower
call's time and of the time since the burst ended, and the mean over 10 ms windows against the follower's steady
state (its own calls right after a burst of itself): how many ms after a hotter call the follower is back within
1 %. `bsfa bench`'s Timer warms each implementation up for at least `--warmup-ms` before each timed batch; this
says how long that has to be. Results: DIR/GPU_DATE_[TAG-]transient.{json,md}.
"""
import argparse
import datetime
import sys
import time

import numpy as np

WINDOW_MS = 10.0
SPANS = ((0, 10), (10, 20), (20, 40), (40, 80), (80, 160))  # ms after the burst, the table's columns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--burst-ms", type=float, default=300.0)
    p.add_argument("--follow-ms", type=float, default=300.0)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


def recovery(call_ms, steady_ms, window_ms=WINDOW_MS):
    """Mean call time over steady_ms in each span of SPANS (by each call's end since the burst), and the end of
    the last window_ms-wide window more than 1 % slow (0 when none is)."""
    ms = np.asarray(call_ms, dtype=float)
    t_end = np.cumsum(ms)

    def window(a, b):
        sel = (t_end > a) & (t_end <= b)
        return float(ms[sel].mean() / steady_ms) if sel.any() else float("nan")

    edges = np.arange(0.0, float(t_end[-1]) + window_ms, window_ms)
    slow = [b for a, b in zip(edges[:-1], edges[1:]) if window(a, b) > 1.01]
    return [window(a, b) for a, b in SPANS], float(slow[-1]) if slow else 0.0


def burst(fn, ms):
    """fn back to back for about ms of GPU time (the call's time measured once, so the host never waits)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(ms / one))):
        fn()


def follow(fn, ms, one_ms):
    """Per-call ms of fn right after whatever is queued before it, for about ms."""
    import torch

    count = max(4, int(ms / one_ms))
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    ev[0].record()
    for i in range(count):
        fn()
        ev[i + 1].record()
    ev[-1].synchronize()
    return np.array([ev[i].elapsed_time(ev[i + 1]) for i in range(count)])


def main(argv=None):
    args = parse_args(argv)
    import cupy as cp
    import torch

    import bsfa_cupy
    from bsfa_cupy.tools.benchmark import _input_sets, _peer_fns, _warm_up_clocks, gpu_name, thresholds_for_rho
    from bsfa_cupy.tools.outputs import result_stem, slug, write_result_files

    n = args.n
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    q, k, v = _input_sets(1, n, 32, 8, 128, "float16", l2)[0]
    tm = cp.from_dlpack(bsfa_cupy.block_max_scores(q, k))[0]
    thr = {r: bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm, r, n)) for r in (0.5, 0.1)}
    cudnn = _peer_fns("sdpa-cudnn", [(q, k, v)], True, n)
    fns = {
        "block_max": lambda: bsfa_cupy.block_max_scores(q, k),
        "cudnn": lambda: cudnn(0),
        "dense": lambda: bsfa_cupy.attention(q, k, v),
        "sparse0.5": lambda: bsfa_cupy.attention(q, k, v, thr[0.5]),
        "sparse0.1": lambda: bsfa_cupy.attention(q, k, v, thr[0.1]),
    }
    followers = ("sparse0.5", "sparse0.1", "cudnn", "dense")
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        _warm_up_clocks()
        one = {}
        for name in followers:
            burst(fns[name], 50)
            one[name] = float(np.median(follow(fns[name], 50, 1.0)))
        rows = []
        for fol in followers:
            for pre in dict.fromkeys(("block_max", "cudnn", "dense", "sparse0.1", fol)):
                trials = []
                for _ in range(args.trials):
                    torch.cuda.synchronize()
                    time.sleep(0.3)
                    burst(fns[pre], args.burst_ms)
                    trials.append(follow(fns[fol], args.follow_ms, one[fol]))
                m = min(len(t) for t in trials)
                per_call = np.median(np.stack([t[:m] for t in trials]), axis=0)
                rows.append(dict(pre=pre, follower=fol, call_ms=per_call.tolist()))
    steady = {r["follower"]: float(np.median(r["call_ms"][len(r["call_ms"]) // 2:]))
              for r in rows if r["pre"] == r["follower"]}
    lines = [f"# Calls after a hotter one, {gpu_name()}, {datetime.date.today()}", "",
             f"B=1 Hq=32 Hkv=8 D=128 fp16 causal N={n}; burst {args.burst_ms:.0f} ms, follower {args.follow_ms:.0f} "
             f"ms, median of {args.trials} trials. Follower's mean call time in each span (ms after the burst) "
             "over its steady state (its calls late after a burst of itself); `back` = the end of the last "
             f"{WINDOW_MS:.0f}-ms window more than 1 % slow (0: none).", "",
             "| follower | predecessor | steady ms | first call | 0-10 ms | 10-20 | 20-40 | 40-80 | 80-160 "
             "| back (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = steady[r["follower"]]
        spans, back = recovery(r["call_ms"], base)
        r.update(steady_ms=base, back_ms=back)
        lines.append(f"| {r['follower']} | {r['pre']} | {base:.3f} | {r['call_ms'][0] / base:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in spans) + f" | {back:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    tag = f"{args.tag}-transient" if args.tag else "transient"
    stem = result_stem(slug(gpu_name()), str(datetime.date.today()), tag=tag)
    result = dict(n=n, burst_ms=args.burst_ms, follow_ms=args.follow_ms, trials=args.trials, gpu=gpu_name(), rows=rows)
    write_result_files(args.out, stem, result, text, lambda _: [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
