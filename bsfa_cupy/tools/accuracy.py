"""``bsfa accuracy``: block-sparse vs dense attention as functions of k and N, on synthetic inputs.

For every N, thresholds for all k are calibrated on ``calib_samples`` synthetic samples (seeds
1000, 1001, ...), then one fresh sample (seed 7) runs dense and block-sparse per k. Measured, all
at the attention level (no model):

- relative output error ``||O_sparse - O_dense||_F / ||O_dense||_F``;
- attention mass dropped: 1 - (dense softmax probability on the kept entries), averaged over
  rows. Skipped tiles leave the softmax, so a row's kept mass is
  ``sum_kept exp(s) / sum_all exp(s) = exp(lse_sparse - lse_dense)``: no N x N matrix needed;
- needle retrieval (``synthetic.needle_retrieved``) and kept-tile density.

The CPU path runs the float64 NumPy reference (small N, few heads); the GPU path runs
``bsfa_cupy.attention`` and ``bsfa_cupy.Calibrator`` on float16 inputs.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import bsfa_reference as ref
from bsfa_reference.calibration import check_k_values

from .outputs import check_out_dir, check_tag, result_stem, slug, write_result_files
from .progress import progress as progress_bar
from .synthetic import MIN_N, make_sample, needle_retrieved
from .tiles import causal_tiles

CALIB_SEED0 = 1000
EVAL_SEED = 7  # not in the calibration seeds: thresholds are never tested on their own samples


@dataclass
class Config:
    ns: tuple
    ks: tuple = (16, 32, 64, 96, 128)
    hq: int = 4
    hkv: int = 1
    d: int = 64
    calib_samples: int = 4
    dtype: str = "float16"

    @classmethod
    def for_device(cls, use_gpu: bool, *, ns=None, ks=None, calib_samples=None) -> Config:
        base = (cls(ns=(4096, 8192, 16384, 32768, 65536), hq=32, hkv=8, d=128) if use_gpu
                else cls(ns=(1024, 2048, 4096), hq=4, hkv=1, d=64))
        return cls(ns=tuple(ns or base.ns), ks=tuple(ks or base.ks), hq=base.hq, hkv=base.hkv, d=base.d,
                   calib_samples=calib_samples or base.calib_samples)


class _CpuEngine:
    """The float64 reference on float16-rounded host inputs."""

    xp = np
    device = "cpu-reference"

    def put(self, s):
        return tuple(x.astype(np.float16) for x in (s.q, s.k, s.v))

    def calibrator(self, ks):
        return ref.Calibrator(ks)

    def attention(self, q, k, v, thr):
        return ref.attention(q, k, v, thr, return_lse=True, return_keep=True)

    def host(self, x):
        return np.asarray(x)

    def release(self):
        pass


class _GpuEngine:
    """The kernel on CuPy float16 arrays; synthetic inputs are built on the GPU."""

    def __init__(self):
        from .._backend import cupy

        self.xp = cp = cupy()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def put(self, s):
        return tuple(x.astype(self.xp.float16) for x in (s.q, s.k, s.v))

    def calibrator(self, ks):
        from ..calibration import Calibrator

        return Calibrator(ks)

    def attention(self, q, k, v, thr):
        from ..ops import attention

        thr = None if thr is None else self.xp.asarray(thr)
        return attention(q, k, v, thr, return_lse=True, return_keep=True)

    def host(self, x):
        return self.xp.asnumpy(x)

    def release(self):
        self.xp.get_default_memory_pool().free_all_blocks()


def check(cfg: Config, use_gpu: bool) -> None:
    """ValueError for a configuration the run would fail on, before any work (``--n``-style wording)."""
    if min(cfg.ns) < MIN_N:
        raise ValueError(f"--n {min(cfg.ns)}: expected sequence lengths of at least {MIN_N} (the synthetic samples "
                         f"start with {MIN_N - 1} attention-sink keys)")
    check_k_values(cfg.ks)
    if cfg.calib_samples < 1:
        raise ValueError(f"--calib-samples {cfg.calib_samples}: expected at least 1")
    if not use_gpu:
        from .sizes import check_host_reference

        check_host_reference(cfg.ns, cfg.hq, cfg.d, cfg.hkv)


def run(cfg: Config, *, use_gpu=False, progress=True, out_dir=".", tag=""):
    """Measure every (N, k); returns (result dict, written paths). ``out_dir=None`` writes nothing."""
    check(cfg, use_gpu)
    if out_dir:
        check_out_dir(out_dir)
        check_tag(tag, "tag")  # fails here, not after the measurements
    engine = _GpuEngine() if use_gpu else _CpuEngine()
    xp = engine.xp
    rows = []
    for n in progress_bar(cfg.ns, "accuracy (N)", progress):
        shape = dict(hq=cfg.hq, hkv=cfg.hkv, d=cfg.d, xp=xp)
        cal = engine.calibrator(cfg.ks)
        for seed in range(CALIB_SEED0, CALIB_SEED0 + cfg.calib_samples):
            q, k, _ = engine.put(make_sample(n, seed=seed, **shape))
            cal.update(q, k)
            del q, k
        thresholds = cal.thresholds()  # (K, Hq, T) float32, host

        s = make_sample(n, seed=EVAL_SEED, **shape)
        q, k, v = engine.put(s)
        dense, lse_dense, _ = engine.attention(q, k, v, None)
        tiles = _tile_sets(n, xp)
        for i, kk in enumerate(progress_bar(cfg.ks, f"  N={n}: k", progress)):
            sparse, lse_sparse, keep = engine.attention(q, k, v, thresholds[i])
            rows.append(dict(n=n, k=kk, **_metrics(engine, dense, lse_dense, sparse, lse_sparse, keep, tiles, v,
                                                   s.needles, cfg.hq)))
            del sparse, lse_sparse, keep
        del q, k, v, s, dense, lse_dense
        engine.release()
    result = {"device": engine.device, "date": _dt.date.today().isoformat(), "config": asdict(cfg),
              "calib_seeds": [CALIB_SEED0, CALIB_SEED0 + cfg.calib_samples - 1], "eval_seed": EVAL_SEED,
              "rows": rows}
    paths = write_results(result, out_dir, tag) if out_dir else []
    return result, paths


def _tile_sets(n, xp):
    """Valid and gated (valid, off-diagonal) tiles of causal N x N attention, as xp bool arrays."""
    valid, gated = causal_tiles(n, ref.BLOCK_M, ref.BLOCK_N)
    return xp.asarray(valid), xp.asarray(gated)


def _metrics(engine, dense, lse_dense, sparse, lse_sparse, keep, tiles, v, needles, hq) -> dict:
    xp = engine.xp
    valid, gated = tiles
    heads = keep.shape[0] * keep.shape[1]
    wide = np.float64 if xp is np else np.float32  # float16 kernel outputs: float32 is plenty for a norm
    d_w, s_w = dense.astype(wide), sparse.astype(wide)
    rel_err = float(xp.linalg.norm((s_w - d_w).ravel()) / xp.linalg.norm(d_w.ravel()))
    live = xp.isfinite(lse_dense)  # rows with a valid key (all of them for causal Nq = Nk)
    with np.errstate(invalid="ignore"):
        kept_mass = xp.where(live, xp.exp(xp.where(live, lse_sparse - lse_dense, 0.0)), 0.0)
    mass_dropped = 1.0 - float(kept_mass.sum() / live.sum())
    hits = _needles(engine, dense, sparse, v, needles, hq)
    return dict(
        density=float((keep & valid).sum() / (int(valid.sum()) * heads)),
        gated_kept=float((keep & gated).sum() / max(int(gated.sum()) * heads, 1)),
        mass_dropped=mass_dropped,
        rel_err=rel_err,
        needles_hit=int(hits.sum()),
        needles=int(hits.size),
    )


def _needles(engine, dense, sparse, v, needles, hq):
    """``needle_retrieved`` on host copies of just the needle rows (not the whole outputs).

    Needle t (batch b, head h, query i, key j) becomes batch t, query 0, key 0 of small arrays.
    """
    xp = engine.xp
    b, h, i, j = (xp.asarray(c) for c in needles.T)
    small = lambda x, rows: engine.host(x[b, rows])[:, None].astype(np.float64)  # noqa: E731  (n, 1, H, D)
    compact = np.stack([np.arange(len(needles)), needles[:, 1], np.zeros_like(needles[:, 0]),
                        np.zeros_like(needles[:, 0])], axis=1)
    return needle_retrieved(small(sparse, i), small(dense, i), small(v, j), compact, hq)


# ---------------------------------------------------------------------- reports
def write_results(result: dict, out_dir=".", tag="") -> list:
    """JSON + markdown (+ PNG when matplotlib is there) named after the device, date and tag."""
    stem = result_stem("accuracy", slug(result["device"]), result["date"], tag=tag)
    return write_result_files(out_dir, stem, result, markdown(result),
                              lambda s: [plot(result, s.with_name(s.name + ".png"))])



def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# Attention-level accuracy of calibrated BSFA on {result['device']}, {result['date']}", "",
        f"Synthetic long-context inputs (`bsfa_cupy.tools.synthetic`: sinks, local window, planted needles), "
        f"B=1, Hq={cfg['hq']}, Hkv={cfg['hkv']}, D={cfg['d']}, {cfg['dtype']} inputs, causal, 128x64 tiles. "
        f"Thresholds per k calibrated (mean) on {cfg['calib_samples']} samples (seeds "
        f"{result['calib_seeds'][0]}-{result['calib_seeds'][1]}), evaluated on a separate sample "
        f"(seed {result['eval_seed']}).", "",
        "density = kept tiles / causal tiles; gated kept = kept share of the off-diagonal tiles; "
        "mass dropped = 1 - mean over rows of the dense softmax mass on kept entries "
        "(exp(lse_sparse - lse_dense)); error = relative Frobenius error of the output vs dense. "
        "A query tile at position p has 2p off-diagonal key tiles to gate (N/64 - 2 for the last one), so "
        "k >= N/64 - 2 keeps every tile and equals dense.", "",
        "| N | k | density | gated kept | mass dropped | rel. error | needles |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['n']} | {r['k']} | {r['density']:.3f} | {r['gated_kept']:.3f} | "
                     f"{r['mass_dropped']:.2e} | {r['rel_err']:.2e} | {r['needles_hit']}/{r['needles']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> Path:
    """Four panels against k, one line per N."""
    from .plots import _pyplot

    plt = _pyplot()
    rows = result["rows"]
    panels = [("rel_err", "relative output error", True), ("mass_dropped", "attention mass dropped", True),
              ("needle_rate", "needles retrieved", False), ("density", "kept-tile density", False)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (key, label, log) in zip(axes, panels):
        for n in sorted({r["n"] for r in rows}):
            sel = sorted((r for r in rows if r["n"] == n), key=lambda r: r["k"])
            ys = [r["needles_hit"] / max(r["needles"], 1) if key == "needle_rate" else r[key] for r in sel]
            ax.plot([r["k"] for r in sel], ys, "o-", label=f"N={n}")
        if log:
            ax.set_yscale("symlog", linthresh=1e-6)  # exact zeros (k >= every tile's candidates) stay visible
        else:
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("k (off-diagonal tiles kept in calibration)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Calibrated BSFA vs dense, {result['device']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
