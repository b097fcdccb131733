"""Context-parallel BSFA on the GPUs of one host: exactness against one GPU, and speed.

Run with torchrun, one process per GPU, NVLink multicast off:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 bench/context_parallel.py --out bench/results

For every N and every mode (dense, and thresholds set from the inputs' own tile maxima to keep a
fraction ρ of the gated tiles, as in ``bsfa bench``), rank 0 makes q, k, v of the whole sequence
(broadcast to the others) and runs one ``bsfa_cupy.attention`` call on it; then every rank runs
``bsfa_cupy.distributed.context_parallel_attention`` on its shard, and rank 0 compares the
gathered result with the one-GPU call:

* keep must be identical (every tile decision);
* out within 2 · eps · max(1, max |out|) of the one-GPU out (eps 2^-10 for float16, 2^-7 for
  bfloat16: the GPU suite's rounding floor once for each of the two computations);
* lse within 2 · (1e-4 + 2e-6 · |lse|) of the one-GPU lse (the GPU suite's lse bound against float64,
  once for each computation); rows without a kept key must be -inf in both.

Times: one warm-up call, then the median of ``--repeats`` calls timed with CUDA events; for the
context-parallel call each repeat starts after a barrier and counts its slowest rank. The bar of
the feature is ≥ 1.8× over one GPU on 2 GPUs and ≥ 3.4× on 4, at N = 128K.

Results go to ``<GPU>_<DATE>_<TAG>.json`` and ``.md`` in ``--out`` (rank 0 writes them; TAG
defaults to ``cp<world>``); the exit status is 1 if any exactness check failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
LSE_ATOL, LSE_RTOL = 2e-4, 4e-6
BAR = {2: 1.8, 4: 3.4}  # the speed-up asked for at N = 128K


def build_parser():
    # No option may be a prefix of one of torchrun's (--n, --d): torchrun's argparse reads the script's
    # arguments too and stops at an ambiguous abbreviation (tests/distributed/test_launcher_args.py).
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, nargs="+", default=[32768, 131072, 524288], help="sequence lengths")
    p.add_argument("--rho", type=float, nargs="*", default=[0.25],
                   help="fractions of the gated tiles to keep (besides dense); none: dense only")
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(EPS), default="float16")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (median taken)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON and markdown results")
    p.add_argument("--tag", default="", help="result name suffix (default cp<world>)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # NVLink SHARP (multicast) stays off on these hosts; NCCL reads this when the communicator is made
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import torch
    import torch.distributed as dist

    from bsfa_cupy.tools.outputs import check_out_dir, check_tag

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    try:  # binding the device up front (torch >= 2.3) makes NCCL set up its communicator eagerly
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    except TypeError:
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = check_tag(args.tag or f"cp{world}")
    check_out_dir(args.out)  # on every rank: a rank that stopped alone would leave the others waiting
    unit = 2 * world * 128 if args.layout == "zigzag" else world * 128
    bad = [n for n in args.seqlen if n % unit]
    if bad:
        raise SystemExit(f"--seqlen {bad}: a {args.layout} layout on {world} GPUs needs multiples of {unit}")

    rows = []
    for n in args.seqlen:
        rows += run_length(args, n, rank, world, torch, dist)
        if rank == 0:  # after every length, so that a later one running out of memory loses nothing
            write(args, rows, world, tag, torch)
    dist.destroy_process_group()
    return 1 if any(not r["exact"] for r in rows) else 0  # rows (and the checks) live on rank 0


def run_length(args, n, rank, world, torch, dist):
    """Dense and each ρ at one sequence length: the one-GPU call, the check, both timings."""
    import cupy as cp

    import bsfa_cupy
    from bsfa_cupy.distributed import context_parallel_attention, gather, shard
    from bsfa_cupy.tools.benchmark import realised_rho, thresholds_for_rho

    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda", torch.cuda.current_device())
    full = [torch.empty((args.b, n, h, args.head_dim), dtype=dtype, device=dev)
            for h in (args.hq, args.hkv, args.hkv)]
    if rank == 0:
        gen = torch.Generator(device=dev).manual_seed(n)
        for x in full:
            x.normal_(generator=gen)
    for x in full:
        dist.broadcast(x, src=0)
    local = [shard(x, rank, world, args.layout).contiguous() for x in full]
    q, k, v = full if rank == 0 else (None, None, None)  # only rank 0 runs the one-GPU call
    del full

    rows = []
    with torch.inference_mode():
        for rho in [None] + list(args.rho):
            thr = None
            if rho is not None:
                table = torch.empty((args.hq, n // 128), dtype=torch.float32, device=dev)
                if rank == 0:
                    tile_max = bsfa_cupy.block_max_scores(q[:1], k[:1])  # (1, Hq, nQ, nK)
                    table.copy_(torch.from_dlpack(thresholds_for_rho(cp.from_dlpack(tile_max[0]), rho, n)))
                    del tile_max
                    cp.get_default_memory_pool().free_all_blocks()
                dist.broadcast(table, src=0)
                thr = bsfa_cupy.DeviceThresholds(table)  # validated once, as a layer loop would hold it
            row = dict(n=n, b=args.b, hq=args.hq, hkv=args.hkv, d=args.head_dim, dtype=args.dtype,
                       layout=args.layout, world=world, rho_target=rho)

            one = None
            if rank == 0:
                one = bsfa_cupy.attention(q, k, v, thr, return_lse=True, return_keep=True)
                row["rho"] = None if rho is None else realised_rho(one[2], n)
                row["ms_1gpu"] = time_ms(lambda: bsfa_cupy.attention(q, k, v, thr), args.repeats, torch)
            dist.barrier()

            out, lse, keep = context_parallel_attention(*local, thr, layout=args.layout, return_lse=True,
                                                        return_keep=True)
            gathered = (gather(out, layout=args.layout), gather(lse, layout=args.layout, dim=2),
                        gather(keep, layout=args.layout, dim=2))
            del out, lse, keep
            if rank == 0:
                row.update(compare(one, gathered, args.dtype, torch))
            del one, gathered
            torch.cuda.empty_cache()

            row["ms_cp"] = time_cp(lambda: context_parallel_attention(*local, thr, layout=args.layout),
                                   args.repeats, torch, dist)
            if rank == 0:
                row["speedup"] = row["ms_1gpu"] / row["ms_cp"]
                rows.append(row)
                print(line(row), flush=True)
            thr = None
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    return rows  # the inputs are freed with this frame


def compare(one, gathered, dtype, torch, rows_per_slice=16384):
    """Exactness of the gathered context-parallel result against the one-GPU call (in slices of the
    sequence, so that float32 copies of the longest outputs never exist whole)."""
    (o1, l1, k1), (o2, l2, k2) = one, gathered
    scale = max(1.0, float(o1.abs().max()))
    out_tol = 2 * EPS[dtype] * scale
    out_err, out_bad, out_nan, row_rel = 0.0, 0, 0, 0.0
    for i in range(0, o1.shape[1], rows_per_slice):
        a, b = o1[:, i:i + rows_per_slice].float(), o2[:, i:i + rows_per_slice].float()
        err = (b - a).abs()
        out_err = max(out_err, float(err.max()))
        # diagnostic only: the error of each (row, head) relative to that row's largest |out|
        row_rel = max(row_rel, float((err.amax(-1) / a.abs().amax(-1).clamp_min(1e-6)).max()))
        out_bad += int((err > out_tol).sum())
        out_nan += int(torch.isnan(b).sum())
    live = torch.isfinite(l1)
    lse_err = torch.where(live, (l2 - l1).abs(), torch.zeros_like(l1))
    lse_over = lse_err > LSE_ATOL + LSE_RTOL * torch.where(live, l1.abs(), torch.zeros_like(l1))
    res = dict(
        out_err=out_err, out_tol=out_tol, out_bad=out_bad, out_nan=out_nan, out_row_rel=row_rel,
        lse_err=float(lse_err.max()), lse_bad=int(lse_over.sum()),
        lse_empty_differ=int((~live & (l2 != l1)).sum()),
        keep_differ=int((k1 != k2).sum()), keep_tiles=int(k1.numel()),
    )
    res["exact"] = (res["out_bad"] == 0 and res["out_nan"] == 0 and res["lse_bad"] == 0
                    and res["lse_empty_differ"] == 0 and res["keep_differ"] == 0)
    return res


def time_ms(fn, repeats, torch):
    """Median ms of fn() on one GPU: one warm-up, then CUDA events around each call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def time_cp(fn, repeats, torch, dist):
    """Median over repeats of the slowest rank's ms; every repeat starts after a barrier."""
    fn()
    torch.cuda.synchronize()
    times = torch.zeros(repeats, dtype=torch.float64, device="cuda")
    for i in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times[i] = start.elapsed_time(stop)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return float(times.sort().values[repeats // 2])


def line(r) -> str:
    mode = "dense" if r["rho_target"] is None else f"rho={r['rho']:.3f}"
    return (f"N={r['n']:7d} {mode:10s} 1 GPU {r['ms_1gpu']:9.2f} ms, {r['world']} GPUs {r['ms_cp']:9.2f} ms: "
            f"{r['speedup']:.2f}x; out err {r['out_err']:.2e} (tol {r['out_tol']:.1e}, {r['out_bad']} over), "
            f"lse err {r['lse_err']:.1e}, keep differs {r['keep_differ']}: {'exact' if r['exact'] else 'FAILED'}")


def markdown(result) -> str:
    w = result["world"]
    lines = [f"# Context-parallel BSFA on {w} × {result['gpu']}, {result['date']}", "",
             f"B={result['rows'][0]['b']}, Hq={result['rows'][0]['hq']}, Hkv={result['rows'][0]['hkv']}, "
             f"D={result['rows'][0]['d']}, {result['rows'][0]['dtype']}, causal, layout {result['layout']}. "
             "Times are medians of CUDA-event timings after one warm-up (context parallel: the slowest rank). "
             f"Exact: keep identical to the one-GPU call, out within 2·eps·max(1, max|out|), lse within "
             f"{LSE_ATOL:g} + {LSE_RTOL:g}·|lse|. "
             + (f"Bar at N=128K: ≥ {BAR[w]}×." if w in BAR else ""), "",
             "`row rel` is the largest error of a (row, head) over that row's largest |out| (not a pass "
             "criterion).",
             "",
             "| N | mode | ρ | 1 GPU ms | CP ms | speed-up | out err (tol) | row rel | lse err | keep differs "
             "| exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mode = "dense" if r["rho_target"] is None else f"ρ≈{r['rho_target']}"
        rho = "" if r["rho"] is None else f"{r['rho']:.3f}"
        lines.append(f"| {r['n']} | {mode} | {rho} | {r['ms_1gpu']:.2f} | {r['ms_cp']:.2f} | {r['speedup']:.2f}× | "
                     f"{r['out_err']:.2e} ({r['out_tol']:.1e}) | {r['out_row_rel']:.1e} | {r['lse_err']:.1e} | "
                     f"{r['keep_differ']} | {'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write(args, rows, world, tag, torch):
    from bsfa_cupy.tools.outputs import result_stem, slug, write_result_files

    result = {"gpu": torch.cuda.get_device_name(), "date": _dt.date.today().isoformat(), "world": world,
              "layout": args.layout, "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
              "torch": torch.__version__, "rows": rows}
    stem = result_stem(slug(result["gpu"]), result["date"], tag=tag)
    for path in write_result_files(args.out, stem, result, markdown(result), lambda stem: []):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
