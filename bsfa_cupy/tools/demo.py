"""``bsfa demo``: calibrate on synthetic long-context samples, then run dense vs block-sparse."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

import bsfa_reference as ref
from bsfa_reference.calibration import check_k_values

from .progress import progress as progress_bar
from .synthetic import MIN_N, make_sample, needle_retrieved
from .tiles import causal_tiles


@dataclass
class DemoConfig:
    n: int
    hq: int
    hkv: int
    d: int
    k: int
    calib_samples: int = 4
    dtype: str = "float16"


CPU_CONFIG = DemoConfig(n=2048, hq=4, hkv=1, d=64, k=8)
GPU_CONFIG = DemoConfig(n=16384, hq=32, hkv=8, d=128, k=64)


def check(use_gpu: bool, *, n=None, k=None, plot=None) -> DemoConfig:
    """The run's configuration, or ValueError/ImportError for one it would fail on, before any work."""
    cfg = GPU_CONFIG if use_gpu else CPU_CONFIG
    cfg = DemoConfig(n or cfg.n, cfg.hq, cfg.hkv, cfg.d, k or cfg.k, cfg.calib_samples, cfg.dtype)
    if cfg.n < MIN_N:
        raise ValueError(f"--n {cfg.n}: expected a sequence length of at least {MIN_N} (the synthetic samples start "
                         f"with {MIN_N - 1} attention-sink keys)")
    check_k_values([cfg.k])
    from . import sizes

    if use_gpu:  # the samples are built and the results checked on the host
        sizes.check_host_memory(cfg.n, lambda m: sizes.gpu_demo_host_bytes(m, cfg.hq, cfg.d, cfg.hkv),
                                what="the demo")
    else:
        sizes.check_host_reference([cfg.n], cfg.hq, cfg.d, cfg.hkv)
    if plot:
        from .outputs import check_out_file
        from .plots import check_image_path

        check_out_file(plot, "--plot")
        check_image_path(plot, "--plot")
    return cfg


def run(use_gpu: bool | None = None, *, n=None, k=None, plot=None, progress=True, echo=print) -> dict:
    """Run the demo; returns the printed numbers. ``use_gpu=None`` picks the GPU when available."""
    from .._backend import has_gpu

    if use_gpu is None:
        use_gpu = has_gpu()
    cfg = check(use_gpu, n=n, k=k, plot=plot)
    engine = _GpuEngine() if use_gpu else _CpuEngine()
    echo(f"bsfa demo on {engine.name}: N={cfg.n}, Hq={cfg.hq}, Hkv={cfg.hkv}, D={cfg.d}, {cfg.dtype}, causal, k={cfg.k}")
    if not use_gpu:
        echo("  (no GPU/CuPy found: NumPy float64 reference at a small size; no speedup is claimed on the CPU)")

    # Calibrate on separate samples of the same distribution, then apply to a fresh one.
    t0 = time.perf_counter()
    cal = _EngineCalibrator(engine, [cfg.k])
    seeds = range(100, 100 + cfg.calib_samples)
    for seed in progress_bar(seeds, "  calibrating", progress):
        q_cal, k_cal, _ = engine.put(make_sample(cfg.n, hq=cfg.hq, hkv=cfg.hkv, d=cfg.d, seed=seed))
        cal.update(q_cal, k_cal)
    thresholds = cal.thresholds()[0]
    t_cal = time.perf_counter() - t0

    s = make_sample(cfg.n, hq=cfg.hq, hkv=cfg.hkv, d=cfg.d, seed=7)
    dense, sparse, keep, timing = engine.run(*engine.put(s), thresholds)
    stats = _stats(dense, sparse, keep, s, cfg)
    stats.update(timing, calibration_s=t_cal)
    echo(f"  sequence length       {cfg.n}")
    echo(f"  kept-tile density     {stats['density']:.3f} of the causal tiles ({stats['gated_kept']:.3f} of the gated off-diagonal ones)")
    echo(f"  P.V work skipped      {stats['pv_skipped']:.1%}")
    echo(f"  output error vs dense {stats['rel_err']:.2e} (relative Frobenius)")
    echo(f"  needles retrieved     {stats['needles_hit']}/{stats['needles']}")
    if "speedup" in stats:
        echo(f"  time dense / sparse   {stats['dense_ms']:.3f} ms / {stats['sparse_ms']:.3f} ms -> {stats['speedup']:.2f}x")
    if plot:
        from .plots import keep_heatmap

        keep_heatmap(keep, head=0, path=plot, title=f"kept tiles, head 0, N={cfg.n}, k={cfg.k}")
        echo(f"  keep-mask heatmap     {plot}")
    return stats


def _stats(dense, sparse, keep, s, cfg):
    keep = np.asarray(keep)
    valid_tiles, gated = causal_tiles(cfg.n, ref.BLOCK_M, ref.BLOCK_N)
    kept_gated = (keep & gated[None, None]).sum() / max(gated.sum() * keep.shape[0] * keep.shape[1], 1)
    density = keep.sum() / (valid_tiles.sum() * keep.shape[0] * keep.shape[1])
    err = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
    hits = needle_retrieved(sparse, dense, s.v, s.needles, cfg.hq)
    return dict(density=float(density), gated_kept=float(kept_gated), pv_skipped=float(1 - density),
                rel_err=float(err), needles=int(len(hits)), needles_hit=int(hits.sum()))


class _EngineCalibrator(ref.Calibrator):
    """The reference calibration rule fed with tile maxima from the engine (CPU or GPU kernel)."""

    def __init__(self, engine, k_values):
        super().__init__(k_values)
        self._engine = engine

    def _tile_max(self, q, k):
        return self._engine.block_max(q, k)


class _CpuEngine:
    name = "CPU (NumPy reference)"

    def put(self, s):
        return tuple(x.astype(np.float16) for x in (s.q, s.k, s.v))

    def block_max(self, q, k):
        return ref.block_max_scores(q, k)

    def run(self, q, k, v, thresholds):
        dense = ref.attention(q, k, v)
        sparse, keep = ref.attention(q, k, v, thresholds, return_keep=True)
        return dense, sparse, keep, {}


class _GpuEngine:
    def __init__(self):
        import cupy as cp

        self.cp = cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.name = f"GPU ({props['name'].decode()}, bsfa_cupy kernel)"

    def put(self, s):
        return tuple(self.cp.asarray(x.astype(np.float16)) for x in (s.q, s.k, s.v))

    def block_max(self, q, k):
        from ..ops import block_max_scores

        return self.cp.asnumpy(block_max_scores(q, k))

    def run(self, q, k, v, thresholds):
        from ..ops import attention
        from .timing import time_ms

        thr = self.cp.asarray(thresholds)
        dense = attention(q, k, v)
        sparse, keep = attention(q, k, v, thr, return_keep=True)
        dense_ms = time_ms(lambda: attention(q, k, v))
        sparse_ms = time_ms(lambda: attention(q, k, v, thr))
        to_host = lambda x: self.cp.asnumpy(x).astype(np.float32)  # noqa: E731
        timing = dict(dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms)
        return to_host(dense), to_host(sparse), self.cp.asnumpy(keep), timing

