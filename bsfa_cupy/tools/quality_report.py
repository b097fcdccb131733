"""The markdown table and the Pareto plot of ``bsfa quality`` results."""
from __future__ import annotations

from pathlib import Path

#: the quality bounds the summary reports the most skipping within (Δppl %)
BOUNDS = (1.0, 0.1)


def skipped_pv(row, n: int) -> float:
    """Skipped P·V work of a row as a share of the dense work of the kernel's 128 x 64 tiles at N = n.

    A rule with other query tiles has another candidate grid (finer tiles hug the causal diagonal), so
    its own skipped share is not comparable; the skipped tile area over the 128 x 64 grid's candidate
    area is: skipped tiles x block_m / (calls x candidates_128 x 128), with calls = all tiles / candidates.
    """
    from bsfa_reference.tiles import BLOCK_M, BLOCK_N, candidate_tiles

    from .quality import parse_rule

    block_m = parse_rule(row["rule"]).block_m if "rule" in row else BLOCK_M
    t = row["tiles"]
    own = int(candidate_tiles(n, n, block_m, BLOCK_N, causal=True).sum())
    calls = (t["kept_gated"] + t["skipped_gated"] + t["diagonal"]) / own
    base = int(candidate_tiles(n, n, BLOCK_M, BLOCK_N, causal=True).sum())
    return t["skipped_gated"] * block_m / (calls * base * BLOCK_M) if calls else 0.0


def best_within(rows, bound: float, n: int):
    """The row that skips most P·V work with Δppl ≤ bound %, or None."""
    ok = [r for r in rows if r["dppl_pct"] <= bound]
    return max(ok, key=lambda r: skipped_pv(r, n)) if ok else None


def summary(result: dict) -> list[dict]:
    """Per N, rule and bound: the best measured setting within the bound (by skipped P·V work)."""
    out = []
    for run in result["runs"]:
        for rule in dict.fromkeys(r["rule"] for r in run["rows"]):
            rows = [r for r in run["rows"] if r["rule"] == rule]
            for bound in BOUNDS:
                best = best_within(rows, bound, run["n"])
                out.append({"n": run["n"], "rule": rule, "bound_pct": bound,
                            "k": None if best is None else best["k"],
                            "skipped_pv": 0.0 if best is None else skipped_pv(best, run["n"]),
                            "dppl_pct": None if best is None else best["dppl_pct"]})
    return out


def _k(r) -> str:
    return f"m≤{r['k']:g}" if isinstance(r["k"], float) else str(r["k"])


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# Model quality of calibrated BSFA on {result['device']}, {result['date']}", "",
        f"Model `{Path(result['model']).name}` ({result['dtype']}). Per N and gate rule, thresholds for every k "
        f"calibrated on {cfg['texts_calib']} documents (cut to N tokens, or to the rule's @ length); "
        f"{cfg['texts_eval']} held-out documents cut to N tokens evaluated, dense (SDPA) against BSFA.", "",
        "Rules: paper = 128-query x 64-key tiles, mean of the per-sample midpoints; bm64 / bm16 = 64 / 16 query "
        "rows per gate decision (own thresholds, CPU reference only); median = median instead of mean; layer-k = "
        "each layer the smallest k whose mean dropped mass on the calibration texts is ≤ m (k column: m≤target); "
        "RULE@C = calibrated on the texts cut to C tokens.", "",
        "ppl = exp(mean next-token NLL over the evaluation texts); Δppl relative to dense; top-1 = share of "
        "positions whose argmax next token equals dense's; skipped gated = skipped share of the off-diagonal "
        "candidate tiles; skipped all = skipped share of all candidate tiles of the rule's tile grid (diagonal "
        "included); skipped P·V = skipped tile area over the candidate area of the kernel's 128 x 64 grid (the "
        "dense P·V work; equal to skipped all for 128-row rules, comparable across rules); mass = mean "
        "dropped softmax mass per query row (each layer against its dense attention on the same inputs); max "
        "|Δlogit| relative to the largest dense |logit|.", "",
        "| N | rule | k | ppl dense | ppl BSFA | Δppl % | top-1 | skipped gated | skipped all | skipped P·V | mass | "
        "max rel. Δlogit |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for r in run["rows"]:
            mass = f"{r['mass_mean']:.2e}" if "mass_mean" in r else "–"
            lines.append(f"| {run['n']} | {r['rule']} | {_k(r)} | {r['ppl_dense']:.3f} | {r['ppl']:.3f} | "
                         f"{r['dppl_pct']:+.3f} | {r['top1']:.4f} | {r['skipped_gated']:.3f} | "
                         f"{r['skipped_all']:.3f} | {skipped_pv(r, run['n']):.3f} | {mass} | "
                         f"{r['max_rel_logit_diff']:.2e} |")
    lines += ["", "Most P·V work skipped within a Δppl bound (among the measured settings):", "",
              "| N | rule | bound | k | skipped P·V | Δppl % |", "|---:|---|---:|---:|---:|---:|"]
    for s in summary(result):
        k = "none" if s["k"] is None else _k(s)
        d = "–" if s["dppl_pct"] is None else f"{s['dppl_pct']:+.3f}"
        lines.append(f"| {s['n']} | {s['rule']} | ≤ {s['bound_pct']:g} % | {k} | {s['skipped_pv']:.3f} | {d} |")
    lines += ["", "Per layer (0 = first): skipped share of the gated tiles; with head statistics also the mean "
              "dropped mass (×1e3) and the worst head's relative output error:", ""]
    for run in result["runs"]:
        for r in run["rows"]:
            lines.append(f"- N={run['n']} {r['rule']} {_k(r)}: skipped " +
                         " ".join(f"{x:.2f}" for x in r["layer_skipped_gated"]))
            if "layer_mass" in r:
                lines.append("  - mass×1e3 " + " ".join(f"{1e3 * x:.1f}" for x in r["layer_mass"]))
                lines.append("  - worst head err " + " ".join(f"{max(h):.3f}" for h in r["head_rel_err"]))
            if "layer_k" in r:
                lines.append("  - k per layer " + " ".join("–" if k is None else str(k) for k in r["layer_k"]))
    for run in result["runs"]:
        for rule, cal in run.get("calibration", {}).items():
            mass = cal.get("calibration_mass")
            if not mass:
                continue
            ks = cal.get("k_values") or result["config"]["ks"]
            lines += ["", f"N={run['n']} {rule}: mean dropped mass per layer on the calibration texts (×1e3), "
                      "every layer at k:", ""]
            lines += [f"- k={k}: " + " ".join(f"{1e3 * row[j]:.1f}" for row in mass) for j, k in enumerate(ks)]
    if result.get("needle"):
        lines += ["", "Needle retrieval (share of trials whose answer tokens are all top-1; depths "
                  f"{result['needle'][0]['depths']}):", "", "| N | trials | dense | BSFA (rule, k: share) |",
                  "|---:|---:|---:|---|"]
        for nd in result["needle"]:
            t = nd["trials"]
            bs = ", ".join(f"{nd['rule']} k={k}: {v / t:.2f}" for k, v in nd["bsfa"].items())
            lines.append(f"| {nd['n']} | {t} | {nd['dense'] / t:.2f} | {bs} |")
    lines += ["", "Texts: " + "; ".join(f"N={run['n']}: calibration {', '.join(run['calib_texts'])}, evaluation "
                                        f"{', '.join(run['eval_texts'])}" for run in result["runs"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> Path:
    """Pareto view per N: skipped share of all tiles (x) against Δppl % (y), one curve per gate rule."""
    from .plots import _pyplot

    plt = _pyplot()
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for rule in dict.fromkeys(r["rule"] for r in run["rows"]):
            rows = sorted((r for r in run["rows"] if r["rule"] == rule), key=lambda r: skipped_pv(r, run["n"]))
            xs = [skipped_pv(r, run["n"]) for r in rows]
            ax.plot(xs, [r["dppl_pct"] for r in rows], "o-", ms=4, label=rule)
            for x, r in zip(xs, rows):
                ax.annotate(_k(r), (x, r["dppl_pct"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for bound in BOUNDS:
            ax.axhline(bound, color="grey", lw=0.7, ls=":")
        ax.set_yscale("symlog", linthresh=0.01)  # Δppl spans 0.001 % to tens of %
        ax.set_xlabel("P·V work skipped (share of the dense 128 x 64 tiles' area)")
        ax.set_ylabel("Δ perplexity vs dense (%)")
        ax.set_title(f"N = {run['n']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"BSFA gate rules, {Path(result['model']).name}, {result['device']}, {result['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
