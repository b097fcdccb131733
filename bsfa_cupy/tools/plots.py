"""Matplotlib figures (optional extra ``plot``)."""
from __future__ import annotations

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'bsfa-cupy[plot]'") from exc
    return plt


def check_image_path(path, option="--plot") -> None:
    """ImportError without matplotlib, ValueError for a file name whose suffix it cannot write (savefig
    would otherwise add ".png" to a bare name, or fail after all the work for an unknown one)."""
    from pathlib import Path

    _pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    kinds = FigureCanvasAgg.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise ValueError(f"{option} {path}: expected a file name ending in one of "
                         f"{', '.join('.' + s for s in sorted(kinds))}")


def keep_heatmap(keep, *, head=0, batch=0, path="keep.png", title=None) -> str:
    """PNG of one head's kept tiles (query tile x key tile) from a (B, Hq, nQ, nK) keep mask."""
    plt = _pyplot()
    mask = np.asarray(keep)[batch, head].astype(float)
    fig, ax = plt.subplots(figsize=(6, 6 * mask.shape[0] / max(mask.shape[1], 1) + 0.8))
    ax.imshow(mask, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
    ax.set_xlabel("key tile (64 keys)")
    ax.set_ylabel("query tile (128 queries)")
    ax.set_title(title or f"kept tiles, head {head}: {mask.mean():.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def bench_plots(result: dict, stem) -> list:
    """Two PNGs from a benchmark result: speedup vs ρ per N, and TFLOP/s vs N per implementation."""
    rows = [r for r in result["rows"] if r["ms"]]
    shapes = sorted({(r["dtype"], r["d"], r["hkv"]) for r in rows if r["causal"]})
    if not shapes:
        return []

    def speedup(ax, sel):
        for n in sorted({r["n"] for r in sel}):
            dense = [r["ms"] for r in sel if r["n"] == n and r["impl"] == "bsfa-dense"]
            sp = sorted((r["rho"], r["ms"]) for r in sel if r["n"] == n and r["impl"] == "bsfa-sparse")
            if dense and sp:
                ax.plot([x for x, _ in sp], [dense[0] / t for _, t in sp], "o-", label=f"N={n}")
        ax.set_xscale("log")
        ax.set_xlabel("realised keep fraction ρ of gated tiles")
        ax.set_ylabel("speedup over our dense")

    def throughput(ax, sel):
        for impl in ("bsfa-dense", "bsfa-sparse@0.1", "bsfa-calibrated", "sdpa-flash", "sdpa-cudnn", "flex"):
            name, _, rho = impl.partition("@")
            pts = sorted({r["n"]: r["tflops"] for r in sel if r["impl"] == name
                          and (not rho or r["rho_target"] == float(rho))}.items())
            if pts:
                ax.plot([n for n, _ in pts], [t for _, t in pts], "o-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("dense-equivalent TFLOP/s")

    where = f"{result['gpu']}, {result['date']}"  # a line of its own: long GPU names overflow one panel
    return [
        _shape_panels(rows, shapes, speedup, f"BSFA sparse speedup\n{where}", f"{stem}_speedup.png"),
        _shape_panels(rows, shapes, throughput, f"Causal attention throughput\n{where}", f"{stem}_tflops.png"),
    ]


def _shape_panels(rows, shapes, draw, title, path):
    """One panel per (dtype, D, Hkv) of the causal rows, drawn by ``draw(ax, rows)``."""
    from pathlib import Path

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(4.5 * len(shapes), 6.0), 4.4), squeeze=False)
    for ax, (dt, d, hkv) in zip(axes[0], shapes):
        draw(ax, [r for r in rows if (r["dtype"], r["d"], r["hkv"], r["causal"]) == (dt, d, hkv, True)])
        ax.set_title(f"{dt} D={d} Hkv={hkv}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel can be empty (e.g. peers only, no sparse rows)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
