"""A small case matrix for compute-sanitizer (memcheck, racecheck, synccheck): every kernel, ragged shapes.

Runs `attention` and `block_max_scores` on each kernel the GPU has: backend "sm80" (mma.sync, any GPU)
and, on compute capability 9.0, "sm90" (wgmma) and "sm90ws" (warp-specialised TMA + wgmma,
its split entry included), and the split-KV kernel "splitkv" (attention only: packed GQA rows, 1 / 3 / 64 splits, then the merge). Per kernel:
float16 and bfloat16, head dims 64 and 128, causal and not, ragged sequence lengths, dense and with
thresholds, returning lse and keep masks; explicit offsets (q_start / k_start, keys after every query
included) and a packed batch (`attention_varlen`: empty sequences, lengths at the tile edges, a wider
max_seqlen_q). Last, one case per kernel and mask with a
NaN in q, k and v: every output row that sees a NaN must
be NaN (checked here), with no access out of bounds (checked by the sanitizer).

Usage: compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_cases.py
--clusters: the sm90ws modules of head dim 128 run their cluster entries (bsfa_fwd_mc, bsfa_fwd_dense_mc,
bsfa_block_max_mc) in place of the plain ones (every case here has a GQA group of two).
--pair-tiles: their dense calls run bsfa_fwd_dense_pair (clusters of two query tiles of one head) instead.
--wide-rows: the sm90ws modules of head dim 64 run every dense call on bsfa_fwd_dense_wide (192-row tiles),
those asking for keep included (keep is then left unwritten).
--unlagged: they run every unsplit call with thresholds on bsfa_fwd (S waits for the gate exchange)
instead of bsfa_fwd_lag.
--narrow-block-max: they run block_max_scores on bsfa_block_max (128-row query tiles) instead of
bsfa_block_max_wide.
--head-pairs: they run every unsplit call of the fixed-length cases, dense or with thresholds, on
bsfa_fwd_headpair (two query heads a CTA, a whole BSFA tile a consumer warpgroup).
--head-dim 64 (or 128) keeps the cases of that head dim only (the NaN cases, at 128, run when it is kept).
A line "case: ..." as each group of calls starts shows where a run cut short by its time limit was; --each adds
a line before every call (its function, q's shape and the arguments that pick the entry) and its seconds after it,
the device synchronised in between, so that a tool that stalls shows the launch it stalls in.
"""
import argparse
import time

import numpy as np

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--backend", choices=("sm80", "sm90", "sm90ws", "splitkv"), action="append",
               help="run only this kernel (repeatable; default: every kernel the GPU has)")
p.add_argument("--clusters", action="store_true", help="sm90ws at head dim 128: the cluster entries")
p.add_argument("--pair-tiles", action="store_true", help="sm90ws at head dim 128: dense calls on tile pairs")
p.add_argument("--wide-rows", action="store_true", help="sm90ws at head dim 64: dense calls on 192-row tiles")
p.add_argument("--unlagged", action="store_true", help="sm90ws: gated calls on bsfa_fwd, S waiting for the gate")
p.add_argument("--narrow-block-max", action="store_true", help="sm90ws: block_max_scores on 128-row query tiles")
p.add_argument("--head-pairs", action="store_true", help="sm90ws: unsplit calls on bsfa_fwd_headpair")
p.add_argument("--no-packed", action="store_true",
               help="leave out the packed batches (attention_varlen), to see the fixed-length calls through a slow tool")
p.add_argument("--head-dim", type=int, choices=(64, 128), action="append",
               help="run only this head dim (repeatable; default: both)")
p.add_argument("--each", action="store_true", help="a line before and after every call, synchronised")
args = p.parse_args()
_started = time.perf_counter()

import cupy as cp  # noqa: E402  (after argparse: --help works without a GPU)

import bsfa_cupy  # noqa: E402


def _swap_sm90ws(method: str, **kw) -> None:
    """sm90ws modules come back as module.<method>(**kw) (an entry swapped in for tests), the others as they are."""
    from bsfa_cupy import ops

    real = ops.get_module

    def get_module(key, *rest):
        mod = real(key, *rest)
        return getattr(mod, method)(**kw) if key.arch == "sm90ws" else mod

    ops.get_module = get_module


for flag, method in (("clusters", "clustered"), ("pair_tiles", "tile_pairs"), ("wide_rows", "wide_rows"),
                     ("unlagged", "unlagged"), ("narrow_block_max", "narrow_block_max")):
    if getattr(args, flag):
        _swap_sm90ws(method)
if args.head_pairs:
    _swap_sm90ws("head_pairs", dense=True)

rng = np.random.default_rng(0)
hopper = str(cp.cuda.Device().compute_capability) == "90"
backends = args.backend or (["sm80", "sm90", "sm90ws", "splitkv"] if hopper else ["sm80", "splitkv"])


def inputs(nq, nk, d, dtype):
    q = cp.asarray(rng.standard_normal((1, nq, 2, d), dtype=np.float32)).astype(dtype)
    k = cp.asarray(rng.standard_normal((1, nk, 1, d), dtype=np.float32)).astype(dtype)
    v = cp.asarray(rng.standard_normal((1, nk, 1, d), dtype=np.float32)).astype(dtype)
    return q, k, v


head_dims = tuple(args.head_dim or (64, 128))
n_calls = 0


def _each(name, fn):
    """fn with a line before its launch and one with its seconds once the device is done (--each)."""
    thr_at = {"attention": 2, "attention_varlen": 4}.get(name)  # thresholds' place after q

    def call(q, *rest, **kw):
        picks = {k: kw[k] for k in ("backend", "causal", "num_splits", "q_start", "k_start", "return_keep")
                 if k in kw}
        kind = "" if thr_at is None else "dense" if len(rest) <= thr_at or rest[thr_at] is None else "thresholds"
        print(f"  {name} q{tuple(q.shape)} {q.dtype} {kind} {picks}", end=" ", flush=True)
        t0 = time.perf_counter()
        res = fn(q, *rest, **kw)
        cp.cuda.Device().synchronize()
        print(f"{time.perf_counter() - t0:.2f} s", flush=True)
        return res

    return call


if args.each:
    for _name in ("attention", "block_max_scores", "attention_varlen"):
        setattr(bsfa_cupy, _name, _each(_name, getattr(bsfa_cupy, _name)))


def progress(*case):
    """One line as each group of calls starts, so that a run cut short by its time limit shows where it was."""
    print("case:", *case, f"(at {time.perf_counter() - _started:.0f} s)", flush=True)


# split-KV: decode and short chunks (GQA 4 and 8 packed), more splits than key tiles, several query tiles
for dtype in ("float16", "bfloat16") if "splitkv" in backends else ():
    for d in head_dims:
        for causal in (True, False):
            for nq, nk, hq in ((1, 577, 8), (3, 200, 8), (16, 577, 4), (200, 130, 2), (130, 200, 2)):
                progress("splitkv", dtype, d, causal, nq, nk)
                q = cp.asarray(rng.standard_normal((1, nq, hq, d), dtype=np.float32)).astype(dtype)
                k = cp.asarray(rng.standard_normal((1, nk, 1, d), dtype=np.float32)).astype(dtype)
                v = cp.asarray(rng.standard_normal((1, nk, 1, d), dtype=np.float32)).astype(dtype)
                tm = bsfa_cupy.block_max_scores(q, k, causal=causal, backend="sm80")
                thr = float(cp.median(tm[cp.isfinite(tm)]))
                for t, s in ((None, 3), (thr, 1), (thr, 64)):
                    bsfa_cupy.attention(q, k, v, t, causal=causal, return_lse=True, return_keep=True,
                                        backend="splitkv", num_splits=s)
                    n_calls += 1
                bsfa_cupy.attention(q, k, v, thr, causal=causal, return_lse=True, return_keep=True,
                                    backend="splitkv", q_start=256, k_start=64)
                n_calls += 1
for backend in (b for b in backends if b != "splitkv"):
    for dtype in ("float16", "bfloat16"):
        for d in head_dims:
            for causal in (True, False):
                for nq, nk in ((200, 130), (130, 200), (64, 64)):
                    progress(backend, dtype, d, causal, nq, nk)
                    q, k, v = inputs(nq, nk, d, dtype)
                    tm = bsfa_cupy.block_max_scores(q, k, causal=causal, backend=backend)
                    thr = float(cp.median(tm[cp.isfinite(tm)]))
                    for t in (None, thr):
                        bsfa_cupy.attention(q, k, v, t, causal=causal, return_lse=True, return_keep=True,
                                            backend=backend)
                    n_calls += 3
                    # sm90ws's split entries: fp32 partials, empty splits (64), the merge; calls with thresholds
                    # of these 130 and 200 rows (a GQA group of two) take bsfa_fwd_split_headpair, the 64 rows
                    # bsfa_fwd_split_pack
                    for t, s, q0, keep in ((None, 3, None, True), (thr, 64, 256, True), (thr, 3, None, False),
                                           (thr, 64, 256, False)) if backend == "sm90ws" else ():
                        bsfa_cupy.attention(q, k, v, t, causal=causal, return_lse=True, return_keep=keep,
                                            backend=backend, num_splits=s, q_start=q0)
                        n_calls += 1
                    for q0, k0 in ((0, 192), (256, 0), (0, 512)):
                        bsfa_cupy.block_max_scores(q, k, causal=causal, backend=backend, q_start=q0, k_start=k0)
                        bsfa_cupy.attention(q, k, v, thr, causal=causal, return_lse=True, return_keep=True,
                                            backend=backend, q_start=q0, k_start=k0)
                        n_calls += 2
            if args.no_packed:
                continue
            progress(backend, dtype, d, "both", "packed", "packed")
            # packed: empty sequences first, in the middle and last, tile-edge lengths
            len_q, len_k = [0, 1, 129, 0, 128, 200, 0], [3, 1, 129, 0, 64, 130, 0]
            cu_q = cp.asarray(np.concatenate([[0], np.cumsum(len_q)]).astype(np.int32))
            cu_k = cp.asarray(np.concatenate([[0], np.cumsum(len_k)]).astype(np.int32))
            q = cp.asarray(rng.standard_normal((sum(len_q), 2, d), dtype=np.float32)).astype(dtype)
            k = cp.asarray(rng.standard_normal((sum(len_k), 1, d), dtype=np.float32)).astype(dtype)
            v = cp.asarray(rng.standard_normal((sum(len_k), 1, d), dtype=np.float32)).astype(dtype)
            for causal in (True, False):
                for t in (None, 0.0):
                    bsfa_cupy.attention_varlen(q, k, v, cu_q, cu_k, t, causal=causal, max_seqlen_q=300,
                                               return_lse=True, return_keep=True, backend=backend)
                    n_calls += 1

# NaN in q (row iq, head 0), v (key jv, one element) and k (key jk): one case per kernel and mask. With
# the causal mask (bottom-right aligned) query row i sees keys j <= i + nk - nq, so each NaN reaches
# different rows: row iq sees neither NaN key, rows from jv + nq - nk on see the NaN value (one NaN
# output element), rows from jk + nq - nk on also the NaN score (all NaN). Without the mask every row
# sees both. A row that sees a NaN must hold one.
nq, nk, d = 200, 130, 128
iq, jv, jk = 100, 90, 120
rows = np.arange(nq)
bad = []
for backend in backends if d in head_dims else ():
    for causal in (True, False):
        q, k, v = inputs(nq, nk, d, "float16")
        q[0, iq, 0, 3] = cp.nan
        k[0, jk, 0, 5] = cp.nan
        v[0, jv, 0, 7] = cp.nan
        bsfa_cupy.block_max_scores(q, k, causal=causal, backend="sm80" if backend == "splitkv" else backend)
        bsfa_cupy.attention(q, k, v, 0.0, causal=causal, return_lse=True, return_keep=True, backend=backend)
        out = bsfa_cupy.attention(q, k, v, causal=causal, backend=backend)
        n_calls += 3
        sees = rows + nk - nq >= jv if causal else np.ones(nq, bool)
        want = np.repeat(sees[:, None], 2, axis=1)  # both query heads share the kv head
        want[iq, 0] = True
        got = cp.asnumpy(cp.isnan(out[0]).any(axis=-1))
        missing = int((want & ~got).sum())
        if missing:
            bad.append(f"{backend} causal={int(causal)}: {missing} of {int(want.sum())} (row, head) outputs that "
                       "see a NaN are not NaN")
cp.cuda.Device().synchronize()
print(f"sanitize cases ran: {n_calls} calls, kernels {backends}")
if bad:
    raise SystemExit("NaN not propagated: " + "; ".join(bad))
print("NaN propagated on every kernel")
