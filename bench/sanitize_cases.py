"""A small variant matrix for compute-sanitizer (memcheck, racecheck): every kernel, ragged shapes.

Both kernel sets run: the sm_90a wgmma ones (on compute capability 9.0) and the mma.sync ones.
"""
import numpy as np

import bsfa_cupy
import cupy as cp
from bsfa_cupy import _kernels

rng = np.random.default_rng(0)
paths = (True, False) if str(cp.cuda.Device().compute_capability) == "90" else (False,)
for sm90, dtype in [(p, dt) for p in paths for dt in ("float16", "bfloat16")]:
    for d in (64, 128):
        for causal in (True, False):
            for nq, nk in ((200, 130), (130, 200), (64, 64)):
                q = cp.asarray(rng.standard_normal((1, nq, 2, d), dtype=np.float32)).astype(dtype)
                k = cp.asarray(rng.standard_normal((1, nk, 1, d), dtype=np.float32)).astype(dtype)
                v = cp.asarray(rng.standard_normal((1, nk, 1, d), dtype=np.float32)).astype(dtype)
                with _kernels.tuning(sm90=sm90):
                    tm = bsfa_cupy.block_max_scores(q, k, causal=causal)
                    thr = float(cp.median(tm[cp.isfinite(tm)]))
                    for t in (None, thr):
                        bsfa_cupy.attention(q, k, v, t, causal=causal, return_lse=True, return_keep=True)
cp.cuda.Device().synchronize()
print("sanitize cases ran, kernel paths:", ["wgmma" if p else "mma.sync" for p in paths])
