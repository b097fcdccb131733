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
