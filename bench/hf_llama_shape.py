"""A Llama-shaped model with random weights on the bsfa transformers backend: logits, padded batches, prefill time.

Usage: python bench/hf_llama_shape.py [--n 16384 32768 65536] [--layers 4] [--k 8 16] [--check-n 2048]
           [--device cuda|cpu] [--dtype bfloat16] [--out DIR] [--tag TAG]
The geometry of an 8B Llama's attention (hidden 4096, 32 query / 8 key-value heads, head dim 128; a small MLP and
vocabulary, since they do not touch attention) with --layers decoder layers, random weights, no download. Checks,
at --check-n tokens: the bsfa backend's logits with thresholds=None against SDPA's (worst |Δ| over max |logit|),
and a padded batch of two rows (--check-n and 3/4 of it) against each row alone (the packed path). Then, per
--n: prefill time of the whole model with SDPA, with dense bsfa and with thresholds calibrated on two random
token sequences of that length at each --k, the share of gated tiles skipped, and the backend's path counts.
Writes <GPU>_<date>_<tag>.{json,md} into --out. On the CPU (float32, the float64 reference) keep sizes tiny:
it exists to check this script, not to time anything.
"""
import argparse
import datetime as _dt
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--n", type=int, nargs="+", default=[16384, 32768, 65536], help="prefill lengths to time")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--k", type=int, nargs="+", default=[8, 16], help="k values to calibrate and time")
p.add_argument("--check-n", type=int, default=2048, help="tokens for the logits and padded-batch checks")
p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="on cuda (cpu: float32)")
p.add_argument("--hidden", type=int, default=4096)
p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--out", default=".")
p.add_argument("--tag", default="llama-shape")
args = p.parse_args()

import torch  # noqa: E402  (after argparse: --help works without torch)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import bsfa_cupy.hf as hf  # noqa: E402
from bsfa_cupy.tools.benchmark import gpu_name  # noqa: E402
from bsfa_cupy.tools.outputs import check_out_dir, check_tag, result_stem, slug, write_result_files  # noqa: E402

check_tag(args.tag)
check_out_dir(args.out)
device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
hq, hkv = args.heads
VOCAB = 1024
cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=1024, num_hidden_layers=args.layers,
                  num_attention_heads=hq, num_key_value_heads=hkv, head_dim=args.hidden // hq,
                  max_position_embeddings=max(args.n + [args.check_n]))
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(device, dtype).eval()


def ids(n, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g).to(device)


def logits(x, **kw):
    with torch.inference_mode():
        return model(input_ids=x, use_cache=False, **kw).logits.float()


def timed(x):
    ms = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first call compiles and warms up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            if device == "cuda":
                torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
    return min(ms[1:])


result = {"gpu": gpu_name() if device == "cuda" else "cpu-reference", "date": _dt.date.today().isoformat(),
          "device": device, "dtype": str(dtype).removeprefix("torch."), "layers": args.layers, "hq": hq, "hkv": hkv,
          "head_dim": args.hidden // hq, "checks": {}, "rows": []}

# Logits: dense bsfa against SDPA.
x = ids(args.check_n, 1)
model.set_attn_implementation("sdpa")
ref = logits(x)
hf.enable(model)
hf.reset_stats(model)
got = logits(x)
err = float((got - ref).abs().max() / ref.abs().max())
result["checks"]["dense_logits_rel_err"] = err
result["checks"]["dense_paths"] = hf.stats(model)
print(f"dense bsfa vs SDPA at N={args.check_n}: worst |Δlogit| / max |logit| = {err:.2e}; paths {hf.stats(model)}")

# A padded batch: each row against its own call (the packed attention_varlen path).
short = args.check_n * 3 // 4
batch = ids(args.check_n, 2, batch=2)
mask = torch.ones_like(batch)
mask[1, : args.check_n - short] = 0  # left padding: row 1 holds `short` real tokens at the end
hf.reset_stats(model)
both = logits(batch, attention_mask=mask)
paths = hf.stats(model)
alone = [logits(batch[:1]), logits(batch[1:, args.check_n - short:])]
pad_err = max(float((both[0] - alone[0][0]).abs().max() / alone[0].abs().max()),
              float((both[1, args.check_n - short:] - alone[1][0]).abs().max() / alone[1].abs().max()))
result["checks"]["padded_rows_rel_err"] = pad_err
result["checks"]["padded_paths"] = paths
print(f"padded batch (rows {args.check_n}, {short}) against each row alone: {pad_err:.2e}; paths {paths}")

# Prefill time per N.
for n in args.n:
    x = ids(n, 3)
    model.set_attn_implementation("sdpa")
    row = {"n": n, "sdpa_ms": timed(x)}
    hf.enable(model)
    row["bsfa_dense_ms"] = timed(x)
    thr = hf.calibrate(model, [ids(n, 4), ids(n, 5)], k_values=args.k, progress=False)
    for k in args.k:
        hf.enable(model, thr, k=k, tile_stats=True)
        hf.reset_stats(model)
        with torch.inference_mode():
            model(input_ids=x, use_cache=False)
        tiles = hf.tile_stats(model)
        kept, skipped = sum(t[0] for t in tiles.values()), sum(t[1] for t in tiles.values())
        hf.enable(model, thr, k=k)  # timed without the statistics' reductions
        row[f"bsfa_k{k}_ms"] = timed(x)
        row[f"bsfa_k{k}_skipped_gated"] = skipped / max(kept + skipped, 1)
    row["paths"] = hf.stats(model)
    result["rows"].append(row)
    print(row, flush=True)
    model.set_attn_implementation("sdpa")

lines = [f"# {result['gpu']}, {result['date']}: a Llama-shaped model ({args.layers} layers, Hq={hq}, Hkv={hkv}, "
         f"D={args.hidden // hq}, random weights, {result['dtype']}) on the bsfa backend", "",
         f"- dense bsfa vs SDPA logits at N={args.check_n}: worst |Δ| / max |logit| = {err:.2e}",
         f"- padded batch of two rows vs each row alone: {pad_err:.2e} (paths {paths})", "",
         "| N | SDPA ms | bsfa dense ms | " + " | ".join(f"k={k} ms (skipped)" for k in args.k) + " |",
         "|---|---|---|" + "---|" * len(args.k)]
for r in result["rows"]:
    cells = [f"{r[f'bsfa_k{k}_ms']:.1f} ({r[f'bsfa_k{k}_skipped_gated']:.0%})" for k in args.k]
    lines.append(f"| {r['n']} | {r['sdpa_ms']:.1f} | {r['bsfa_dense_ms']:.1f} | " + " | ".join(cells) + " |")
stem = result_stem(slug(result["gpu"]), result["date"], tag=args.tag)
for path in write_result_files(args.out, stem, result, "\n".join(lines) + "\n", lambda _stem: []):
    print("wrote", path)
