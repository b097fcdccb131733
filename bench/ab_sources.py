"""A/B of whole kernel sources in one process: the library's module against other versions of one .cu file.

Usage (two steps, the first where git is, the second on the GPU machine):
  python bench/ab_sources.py expand REV OUT.cu [--source bsfa_fwd_sm90ws.cu] [--patch FILE.diff ...]
      the source as of git revision REV of this checkout (or a directory holding a kernels_cu/ tree),
      with the diffs of kernels_cu/ applied (bench/variants/: kernel changes kept for an A/B, not landed),
      headers folded in, the text NVRTC compiles
  python bench/ab_sources.py time NAME=FILE.cu[:DENSE_ENTRY] ... [--cases bar|gate|lag|main|quick|...] [--out DIR]
      [--warmup-ms 100] [--power]
      times the library's module ("base") and each NAME: FILE.cu compiled as a module of its own, whose
      bsfa_fwd replaces the library's (DENSE_ENTRY, e.g. bsfa_fwd_dense, for the calls without
      thresholds) for every call (no cluster, 192-row or head-pair entry of the library's routing takes
      one); name one file twice to see the spread between two identical builds. NAME=@mc is the
      library's own module with its cluster entries (bsfa_fwd_mc, bsfa_fwd_dense_mc, bsfa_block_max_mc)
      in the plain ones' places; NAME=@pair runs its dense calls on bsfa_fwd_dense_pair (clusters of two
      query tiles of one head, any GQA group); NAME=@nowide keeps the dense calls of head dim 64 off
      bsfa_fwd_dense_wide (192-row tiles), on bsfa_fwd_dense; NAME=@plain runs every unsplit dense call on
      bsfa_fwd_dense (neither cluster nor wide entries);
      NAME=@unlagged runs calls with thresholds on bsfa_fwd (S waiting for the gate) instead of bsfa_fwd_lag;
      NAME=@narrowbm runs block_max_scores on bsfa_block_max (128-row query tiles) instead of
      bsfa_block_max_wide; NAME=@headpair runs calls with thresholds of even GQA groups on
      bsfa_fwd_headpair (two query heads a CTA, a whole BSFA tile a consumer warpgroup), and
      NAME=@headpairdense their dense calls too; NAME=FILE.cu@headpair runs both on FILE.cu's
      bsfa_fwd_headpair (the A/B of two versions of that entry); NAME=FILE.cu@pair runs every dense call on
      FILE.cu's bsfa_fwd_dense_pair (against NAME=@pair, the library's), NAME=FILE.cu@mc on its bsfa_fwd_dense_mc
      (even GQA groups only; against NAME=@mc); NAME=FILE.cu@blockmax runs block_max_scores
      on FILE.cu's bsfa_block_max_wide (with --block-max; the forward calls stay the library's).
      --block-max also times block_max_scores per build.
Per case (B=1, Hq=32, causal unless noted): torch SDPA's cuDNN backend, then per build dense and sparse
(rho of the gated tiles kept, thresholds from the inputs' tile maxima, as `bsfa bench` sets them), timed in
9 interleaved repeats of 3 calls (median; each kind of call for every build in turn, the builds' order rotated
every repeat; each batch right after untimed calls of its own, at least two and at least --warmup-ms of them, 100 by
default, so that every build is timed in the steady state the card's power cap sets, as `bsfa bench` does: NOTES
v32), the plan cache cleared at every switch (attention keeps kernel
handles in its plans); each build's dense out and lse are compared with base's, and one call with thresholds
(rho 0.25 where the case has it): its keep mask must equal base's (mismatches printed), out and lse to rounding.
Every module the run loads (the library's and each FILE's, per head dim and dtype) is compiled first, in parallel
processes. Prints a table; --out writes it with the JSON. Only the unsplit forward is swapped: shapes here never split.
--power samples nvidia-smi every 20 ms beside the timings and adds each kind's and build's mean SM clock and power
(over its warm-up and batches): in the card's power-capped steady state, a build that does the same work with
fewer joules runs at a higher clock (NOTES v32); and from them each kind's energy (W x ms, mJ) and SM cycles
(MHz x ms) per call, which tell a build that saves joules from one that saves cycles the clock then takes back
(NOTES v38).
"""
import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# The gate's cases at head dim 128: every gated tile kept down to rho 0.
_GATE_D128 = [dict(n=n, rhos=(1.0, 0.5, 0.25, 0.1, 0.0)) for n in (16384, 32768, 65536)]

CASES = {
    "quick": [dict(n=16384)],
    "main": [dict(n=n) for n in (8192, 16384, 32768)] + [dict(n=32768, d=64, rhos=(0.25,))],
    "bar": [dict(n=n) for n in (8192, 16384, 32768)]
    + [dict(n=16384, dtype="bfloat16", rhos=()), dict(n=16384, hkv=32, rhos=()), dict(n=16384, causal=False, rhos=()),
       dict(n=32768, d=64, rhos=(0.25,)), dict(n=2048, b=8, rhos=()), dict(n=1024, b=32, rhos=())],
    # the tile order's cases: Hkv = Hq, where no GQA group shares a K/V head, against Hkv = 8 and small batches
    "heads": [dict(n=n, hkv=32, rhos=()) for n in (8192, 16384, 32768, 65536)]
    + [dict(n=16384, hkv=32, dtype="bfloat16", rhos=()), dict(n=8192, rhos=()), dict(n=16384, rhos=(0.25,)),
       dict(n=65536, rhos=()), dict(n=16384, causal=False, hkv=32, rhos=()), dict(n=2048, b=8, rhos=()),
       dict(n=1024, b=32, rhos=())],
    # the tile-pair entry's threshold (PAIR_MIN_Q_TILES): odd groups from 2K to 16K rows, causal or not, and batches
    "pairs": [dict(n=n, hkv=32, rhos=()) for n in (2048, 4096, 8192, 16384)]
    + [dict(n=n, hkv=32, causal=False, rhos=()) for n in (4096, 8192, 16384)]
    + [dict(n=8192, hkv=32, dtype="bfloat16", rhos=()), dict(n=4096, b=2, hkv=32, rhos=()),
       dict(n=8192, b=2, hkv=32, rhos=()), dict(n=2048, b=8, hkv=32, rhos=())],
    # block_max_scores (with --block-max): the bar's lengths, bf16, head dim 64, Hkv = 32
    "blockmax": [dict(n=n, rhos=()) for n in (16384, 32768, 65536)]
    + [dict(n=16384, dtype="bfloat16", rhos=()), dict(n=32768, d=64, rhos=()), dict(n=16384, hkv=32, rhos=())],
    # calls with thresholds (bsfa_fwd_lag): the sparse bar's shape, then head dim 64
    "lag": [dict(n=n) for n in (16384, 32768, 65536)] + [dict(n=n, d=64) for n in (8192, 16384, 32768)]
    + [dict(n=16384, d=64, dtype="bfloat16")],
    # the gate's cost: the sparse bar's shapes and head dim 64, from every gated tile kept to rho 0 (only the top
    # gated tile of each head and query tile kept: the cost of skipping, NOTES v25)
    "gate": _GATE_D128 + [dict(n=16384, d=64, rhos=(1.0, 0.5, 0.25, 0.1, 0.0))],
    # the same at head dim 128 only (the head-pair entry's overlapped schedule, without the sequential one's case)
    "gate128": _GATE_D128,
    # head dim 64: the 192-row dense entry's cases
    "d64": [dict(n=n, d=64, rhos=()) for n in (8192, 16384, 32768, 65536)]
    + [dict(n=16384, d=64, dtype="bfloat16", rhos=()), dict(n=16384, d=64, causal=False, rhos=()),
       dict(n=16384, d=64, hkv=32, rhos=()), dict(n=2048, d=64, b=8, rhos=()), dict(n=1024, d=64, b=32, rhos=())],
    "long": [dict(n=n, hkv=32, rhos=()) for n in (16384, 32768, 65536, 131072)]
    + [dict(n=32768, hkv=32, dtype="bfloat16", rhos=())] + [dict(n=n, rhos=()) for n in (16384, 65536, 131072)]
    + [dict(n=32768, rhos=(0.25,))],
}


def expand(rev: str, out: str, source: str, patches=()) -> None:
    from bsfa_cupy import _source

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "kernels_cu"
        if Path(rev).is_dir():
            shutil.copytree(Path(rev) / "kernels_cu", root)
        else:
            blob = subprocess.run(["git", "archive", rev, "kernels_cu"], check=True, capture_output=True,
                                  cwd=Path(__file__).resolve().parents[1]).stdout
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and late 3.10 / 3.11 patch releases)
                    tar.extractall(tmp, filter="data")
                else:
                    tar.extractall(tmp)
        for patch in patches:
            # paths a/kernels_cu/... as `git diff` writes them; outside a repository (the ceiling keeps git from
            # finding one above tmp) git apply patches plain files; without git, patch(1) does
            if shutil.which("git"):
                cmd = ["git", "apply", str(Path(patch).resolve())]
            elif shutil.which("patch"):
                cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(Path(patch).resolve())]
            else:
                raise SystemExit("--patch needs git or patch(1) on this machine")
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                  env={**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(tmp).parent)})
            if done.returncode != 0:
                why = (done.stderr or done.stdout).strip()
                raise SystemExit(f"{patch} does not apply to kernels_cu of {rev}: {why}")
        real = _source.kernels_dir
        _source.kernels_dir = lambda: root
        try:
            # past kernel_source's cache, which holds the library's own tree's text
            Path(out).write_text(_source.kernel_source.__wrapped__(source))
        finally:
            _source.kernels_dir = real


def _compile_one(job):
    from bsfa_cupy import _compile

    text, name, options, is_cubin = job
    _compile.cached_binary(text, name, options, is_cubin)


def _prebuild(builds, cases):
    """Every module the timing will load, compiled into the on-disk cache by parallel processes first: NVRTC takes
    about a minute a module of this source, one at a time in the timing process."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from bsfa_cupy import _compile, _kernels, _source, _variants

    arch_flag, is_cubin = _compile.target("sm90ws", _kernels.compute_capability(0))
    keys = {_variants.VariantKey(c.get("dtype", "float16"), c.get("d", 128), c.get("causal", True), "sm90ws")
            for c in cases}
    jobs = []
    for key in sorted(keys, key=lambda k: k.name()):
        options = _compile.options_for(key.arch, arch_flag) + key.defines()
        jobs.append((_source.kernel_source(key.source), key.name(), options, is_cubin))
        jobs += [(b[0], f"{key.name()}_ab_{name}", options, is_cubin) for name, b in builds.items()
                 if isinstance(b, tuple)]
    started = time.perf_counter()
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        list(pool.map(_compile_one, jobs))
    print(f"compiled {len(jobs)} modules in {time.perf_counter() - started:.0f} s", flush=True)


def load_build(text, key, backend, dev, tag):
    """The module of kernel source `text` for variant `key` (compiled as the library's own, cached on disk under
    the key's name and `tag`), loaded on device `dev`."""
    import cupy as cp

    from bsfa_cupy import _compile, _kernels

    arch_flag, is_cubin = _compile.target(key.arch, _kernels.compute_capability(dev))
    options = _compile.options_for(key.arch, arch_flag) + key.defines() + backend.options()
    raw = cp.cuda.function.Module()
    raw.load(_compile.cached_binary(text, f"{key.name()}_ab_{tag}", options, is_cubin))
    return raw


def headpair_build(mod, raw):
    """The library's module `mod` with `raw`'s bsfa_fwd_headpair as its head-pair entry, which then takes the
    calls of even GQA groups, dense ones too."""
    from bsfa_cupy import _kernels

    hp = dataclasses.replace(
        _kernels._kernel(raw, "bsfa_fwd_headpair", "BSFA_FWD_HEADPAIR", mod.fwd.grid_kind, mod.fwd.sms,
                         _kernels._read_int(raw, "BSFA_FWD_HEADPAIR_KV_BOX"), 3),
        q_box=_kernels._read_int(raw, "BSFA_FWD_HEADPAIR_Q_BOX"), head_pairs=True)
    return dataclasses.replace(mod, fwd_headpair=hp, raw=(mod.raw, raw)).head_pairs(dense=True)


def cluster_build(mod, raw, entry):
    """The library's module `mod` with every dense call on `raw`'s bsfa_fwd_dense_pair (entry "pair", as NAME=@pair
    puts them on the library's own) or bsfa_fwd_dense_mc ("mc": two query heads of a GQA group a cluster, so even
    groups only, as for NAME=@mc), calls with thresholds on the library's routing."""
    from bsfa_cupy import _kernels

    f = mod.fwd
    name = {"pair": "bsfa_fwd_dense_pair", "mc": "bsfa_fwd_dense_mc"}[entry]
    dense = dataclasses.replace(
        _kernels._kernel(raw, name, "BSFA_FWD", f.grid_kind, f.sms, f.tma, 3, _kernels._read_int(raw, "BSFA_FWD_MC")),
        pair_tiles=entry == "pair")
    return dataclasses.replace(mod, fwd_dense=dense, dense_clusters=False, dense_wide=False, raw=(mod.raw, raw))


def clocks_by_label(samples, spans):
    """Mean SM clock (MHz) and power (W) per label over the (time, MHz, W) samples that fall in its (start, end)
    spans of wall-clock time; None for a label none fell in."""
    import numpy as np

    out = {}
    for label, windows in spans.items():
        sel = np.zeros(len(samples), dtype=bool)
        for a, b in windows:
            sel |= (samples[:, 0] >= a) & (samples[:, 0] <= b)
        out[label] = (float(samples[sel, 1].mean()), float(samples[sel, 2].mean())) if sel.any() else None
    return out


def energy_per_call(row, clocks):
    """{label: (mJ, millions of SM cycles)} a call, from a label's time in row (ms) and its mean (MHz, W) in
    clocks (clocks_by_label). Under the card's power cap, cycles saved at equal energy come back in part as a
    lower clock: the two columns tell a build that saves joules from one that saves only cycles (NOTES v38)."""
    return {k: (v[1] * row[k], v[0] * row[k] / 1e3) for k, v in clocks.items()
            if v is not None and isinstance(row.get(k), float)}


def time_builds(specs, cases, out_dir, block_max=False, warmup_ms=100.0, power=False):
    import cupy as cp
    import numpy as np
    import torch

    import bsfa_cupy
    from bsfa_cupy import _kernels, ops
    from bsfa_cupy.tools.benchmark import (Timer, _input_sets, _peer_fns, _warm_up_clocks, dense_flops,
                                           thresholds_for_rho)

    builds = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        if rest in ("@mc", "@pair", "@nowide", "@plain", "@unlagged", "@narrowbm", "@headpair", "@headpairdense"):
            builds[name] = rest
            continue
        path, at, suffix = rest.rpartition("@")
        if at and suffix in ("headpair", "blockmax", "pair", "mc"):
            builds[name] = (Path(path).read_text(), "@" + suffix)
            continue
        path, _, dense_entry = rest.partition(":")
        builds[name] = (Path(path).read_text(), dense_entry or "bsfa_fwd")
    _prebuild(builds, cases)
    all_names = ["base", *builds]
    mode = {"build": "base", "dense": False}
    cache = {}
    real_get_module = ops.get_module

    def get_module(key, backend, dev):
        mod = real_get_module(key, backend, dev)
        b = mode["build"]
        if key.arch != "sm90ws" or b == "base":
            return mod
        if builds[b] == "@nowide":
            return mod.wide_rows(False)
        if builds[b] == "@unlagged":
            return mod.unlagged()
        if builds[b] == "@narrowbm":
            return mod.narrow_block_max()
        if builds[b] in ("@headpair", "@headpairdense"):
            return mod.head_pairs(dense=builds[b] == "@headpairdense")
        if builds[b] == "@plain":
            return dataclasses.replace(mod, dense_clusters=False, dense_wide=False)
        if builds[b] in ("@mc", "@pair"):  # the cluster entries of the library's own module
            mc = mod.clustered()
            if mc is mod:
                raise SystemExit(f"{key.name()}: this module has no cluster entries (head dim 128 only)")
            return mc if builds[b] == "@mc" else mod.tile_pairs()
        text, dense_entry = builds[b]
        entry = dense_entry if mode["dense"] else "bsfa_fwd"
        if (key, b, entry) not in cache:
            raw = load_build(text, key, backend, dev, b)
            if dense_entry == "@blockmax":
                bm = mod.block_max
                wide = dataclasses.replace(
                    _kernels._kernel(raw, "bsfa_block_max_wide", "BSFA_BLOCK_MAX_WIDE", bm.grid_kind, bm.sms, bm.tma, 2),
                    q_box=_kernels._read_int(raw, "BSFA_BLOCK_MAX_WIDE_Q_BOX"))
                cache[(key, b, entry)] = dataclasses.replace(mod, block_max=wide, raw=(mod.raw, raw))
            elif dense_entry == "@headpair":
                cache[(key, b, entry)] = headpair_build(mod, raw)
            elif dense_entry in ("@pair", "@mc"):
                cache[(key, b, entry)] = cluster_build(mod, raw, dense_entry[1:])
            else:
                f = _kernels._kernel(raw, entry, "BSFA_FWD", mod.fwd.grid_kind, mod.fwd.sms, mod.fwd.tma, 3)
                # every call on this build's entry: the library's routing would send dense calls of even groups
                # to its own cluster entry, head dim 64 to its 192-row one, and calls with thresholds of even
                # groups to its head-pair entry, none of which this build replaces
                cache[(key, b, entry)] = dataclasses.replace(mod, fwd=f, fwd_dense=f, dense_clusters=False,
                                                             dense_wide=False, headpairs=False, raw=(mod.raw, raw))
        return cache[(key, b, entry)]

    def use(build, dense):
        mode["build"], mode["dense"] = build, dense
        bsfa_cupy.clear_plan_cache()

    ops.get_module = get_module
    _warm_up_clocks()
    smi = None
    if power:  # nvidia-smi beside the timings: each kind's and build's clock and power while its calls run
        sys.path.insert(0, str(Path(__file__).parent))
        from sustained import SmiSampler

        smi = SmiSampler((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
    spans = {}
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows, lines = [], []
    for c in cases:
        n, d, hkv, b = c["n"], c.get("d", 128), c.get("hkv", 8), c.get("b", 1)
        dtype, causal = c.get("dtype", "float16"), c.get("causal", True)
        rhos = c.get("rhos", (1.0, 0.5, 0.25, 0.1)) if causal and b == 1 else ()
        sets = _input_sets(b, n, 32, hkv, d, dtype, l2)
        row = dict(n=n, d=d, hkv=hkv, b=b, dtype=dtype, causal=causal, warmup_ms=warmup_ms)
        # @mc pairs the query heads of a GQA group: none to pair with an odd group (Hq = 32 here)
        names = [m for m in all_names if not (builds.get(m) == "@mc" and (32 // hkv) % 2)]
        with torch.inference_mode():
            cudnn = _peer_fns("sdpa-cudnn", sets, causal, n)
            use("base", False)
            tms = [cp.from_dlpack(bsfa_cupy.block_max_scores(q, k))[0] for q, k, _ in sets] if rhos else []
            thr = {r: [bsfa_cupy.DeviceThresholds(thresholds_for_rho(tm, r, n)) for tm in tms] for r in rhos}
            ref = None
            for name in names:
                use(name, True)
                o, lse = bsfa_cupy.attention(*sets[0], causal=causal, return_lse=True)
                o, lse = torch.from_dlpack(o).float(), torch.from_dlpack(lse)
                if ref is None:
                    ref = (o, lse)
                else:
                    row[f"{name}:dout"] = float((o - ref[0]).abs().max())
                    row[f"{name}:dlse"] = float((lse - ref[1]).abs().max())
            # The same call with thresholds (rho 0.25, or the case's first): keep must match base's exactly, out
            # and lse to rounding, so that a build that skips the wrong work cannot pass for a fast one.
            rho_c = 0.25 if 0.25 in thr else next(iter(thr), None)
            sref = None
            for name in names if rho_c is not None else ():
                use(name, False)
                o, lse, keep = bsfa_cupy.attention(*sets[0], thr[rho_c][0], causal=causal, return_lse=True,
                                                   return_keep=True)
                o, lse, keep = torch.from_dlpack(o).float(), torch.from_dlpack(lse), torch.from_dlpack(keep)
                if sref is None:
                    sref = (o, lse, keep)
                else:
                    row[f"{name}:sparse_rho"] = rho_c
                    row[f"{name}:sparse_keep_mismatches"] = int((keep != sref[2]).sum())
                    row[f"{name}:sparse_dout"] = float((o - sref[0]).abs().max())
                    row[f"{name}:sparse_dlse"] = float((lse - sref[1]).abs().max())
            kinds = {"dense": (True, lambda i: bsfa_cupy.attention(*sets[i], causal=causal))}
            if block_max:
                kinds["block_max"] = (True, lambda i: bsfa_cupy.block_max_scores(*sets[i][:2], causal=causal))
            for r, th in thr.items():
                kinds[f"rho{r}"] = (False, lambda i, th=th: bsfa_cupy.attention(*sets[i], th[i], causal=causal))
            # Untimed calls before each batch: as many as take warmup_ms at the call's own time (timed once here).
            warm = Timer(9, 3, warmup=2, warmup_ms=warmup_ms)
            lead = {}
            for label, name, dense, fn in [("cudnn", "base", True, cudnn)] + [
                    (f"{name}:{kind}", name, dense, fn) for kind, (dense, fn) in kinds.items() for name in names]:
                use(name, dense)
                lead[label] = warm.lead_for(fn, len(sets))
            times = {}
            for rep in range(9):
                # Each kind of call for every build in turn, the builds' order rotated each repeat: a build's
                # calls with thresholds right after its own dense call ran up to 6 % slower at 16K when that
                # dense entry was the faster one (NOTES v27), a bias that this order spreads over all builds.
                order = names[rep % len(names):] + names[:rep % len(names)]
                fns = [("cudnn", "base", True, cudnn)] + [(f"{name}:{kind}", name, dense, fn)
                                                          for kind, (dense, fn) in kinds.items() for name in order]
                for label, name, dense, fn in fns:
                    use(name, dense)
                    t_warm = time.time()  # the GPU is idle here: the last batch was synchronised
                    for i in range(lead[label]):
                        fn(i % len(sets))
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for i in range(3):
                        fn((rep * 3 + i) % len(sets))
                    stop.record()
                    stop.synchronize()
                    times.setdefault(label, []).append(start.elapsed_time(stop) / 3)
                    if smi is not None:
                        spans.setdefault((n, d, hkv, b, dtype, causal), {}).setdefault(label, []).append(
                            (t_warm, time.time()))
        row.update({k: float(np.median(v)) for k, v in times.items()})
        rows.append(row)
        tf = dense_flops(b, 32, n, d, causal) / 1e9
        head = f"N={n} {dtype} D={d} Hkv={hkv} B={b} {'causal' if causal else 'full'}: cuDNN {tf / row['cudnn']:.0f} TF"
        case = [head + "".join(f" | {m} {tf / row[m + ':dense']:.0f} TF ({row['cudnn'] / row[m + ':dense']:.3f}x)"
                               for m in names)]
        case += [f"    {m}: max|dout| {row[m + ':dout']:.2e} max|dlse| {row[m + ':dlse']:.2e}" for m in names[1:]]
        case += [f"    {m}: with thresholds (rho{row[m + ':sparse_rho']}) keep mismatches "
                 f"{row[m + ':sparse_keep_mismatches']}, max|dout| {row[m + ':sparse_dout']:.2e} "
                 f"max|dlse| {row[m + ':sparse_dlse']:.2e}" for m in names[1:] if m + ":sparse_rho" in row]
        if block_max:
            case += ["    block_max ms (x own dense): " + "  ".join(
                f"{m} {row[m + ':block_max']:.3f} ({row[m + ':block_max'] / row[m + ':dense']:.2f})" for m in names)]
        case += [f"    {m} sparse ms (x cuDNN dense): " + "  ".join(
            f"rho{r}: {row[f'{m}:rho{r}']:.3f} ({row['cudnn'] / row[f'{m}:rho{r}']:.2f}x)" for r in rhos)
            for m in (names if rhos else ())]
        print("\n".join(case), flush=True)
        lines += case
        del sets
        torch.cuda.empty_cache()
    if smi is not None:
        samples = smi.stop()
        for row in rows:
            case_key = (row["n"], row["d"], row["hkv"], row["b"], row["dtype"], row["causal"])
            got = clocks_by_label(samples, spans[case_key])
            for label, v in got.items():
                if v is not None:
                    row[f"{label}:mhz"], row[f"{label}:w"] = v
            line = (f"N={row['n']} {row['dtype']} D={row['d']} Hkv={row['hkv']} B={row['b']} clock and power while "
                    "each kind ran: " + "  ".join(f"{k} {v[0]:.0f} MHz {v[1]:.0f} W" for k, v in got.items() if v))
            line += "\n    energy and SM cycles per call: " + "  ".join(
                f"{k} {mj:.0f} mJ {mcyc:.2f} Mcyc" for k, (mj, mcyc) in energy_per_call(row, got).items())
            print(line, flush=True)
            lines.append(line)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        Path(out_dir, "ab_sources.txt").write_text("\n".join(lines) + "\n")
        Path(out_dir, "ab_sources.json").write_text(json.dumps(rows, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expand", help="write one kernel source as of a git revision, headers folded in")
    e.add_argument("rev")
    e.add_argument("out")
    e.add_argument("--source", default="bsfa_fwd_sm90ws.cu")
    e.add_argument("--patch", action="append", default=[],
                   help="a diff of kernels_cu/ (as `git diff` writes it, e.g. bench/variants/*.diff) applied first")
    t = sub.add_parser("time", help="time the library's module against other sources (GPU)")
    t.add_argument("builds", nargs="+", help="NAME=FILE.cu[:DENSE_ENTRY]")
    t.add_argument("--cases", choices=sorted(CASES), default="bar")
    t.add_argument("--out", default=None)
    t.add_argument("--block-max", action="store_true", help="time block_max_scores per build too")
    t.add_argument("--power", action="store_true",
                   help="sample nvidia-smi every 20 ms and report each kind's and build's mean SM clock and power")
    t.add_argument("--warmup-ms", type=float, default=100.0,
                   help="untimed calls of a kind and build before each of its batches, at least this long (default "
                        "100; 0: two calls, the protocol before v32)")
    args = p.parse_args(argv)
    if args.cmd == "time" and not args.warmup_ms >= 0:
        p.error(f"--warmup-ms: expected a time in ms >= 0, got {args.warmup_ms}")
    if args.cmd == "expand":
        expand(args.rev, args.out, args.source, args.patch)
    else:
        time_builds(args.builds, CASES[args.cases], args.out, args.block_max, args.warmup_ms, args.power)


if __name__ == "__main__":
    sys.exit(main())
