"""Decode steps and short chunks in the transformers backend: bsfa against transformers' SDPA path, per call.

Usage: python bench/hf_short.py [--q 1 2 16 64] [--kv 2048 8192 32768 131072] [--out DIR] [--tag TAG]
One attention call as a model's layer makes it after prefill, with a cache of --kv keys and --q new queries (the
Llama-8B geometry by default: Hq=32, Hkv=8, D=128, bfloat16; B=1). The mask is what transformers' sdpa_mask
gives there: none for one query, else the bottom-right causal bool mask (1, 1, q, kv). Timed per call, back to
back (host time included, as in a model), with CUDA events:
  sdpa      transformers' sdpa_attention_forward (GQA through SDPA's enable_gqa, or K/V repeated where a mask
            rules that out), SDPA picking its backend
  bsfa      the bsfa backend's dense short route forced: the kept mask check read and bsfa_cupy.attention
            through its kept plan, no thresholds
  backend   bsfa_cupy.hf.attention_forward as routed (the path it took is named)
  check     the mask check that the first layer's call runs once per forward, keeping the answer on the mask
            for the other layers (not in the per-call columns)
and the worst |bsfa - sdpa| relative to max |sdpa|. Writes <GPU>_<date>_<tag>.{json,md} into --out.
"""
import argparse
import datetime as _dt

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--q", type=int, nargs="+", default=[1, 2, 16, 64], help="new query rows per call")
p.add_argument("--kv", type=int, nargs="+", default=[2048, 8192, 32768, 131072], help="cache lengths")
p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
p.add_argument("--d", type=int, default=128)
p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
p.add_argument("--calls", type=int, default=50)
p.add_argument("--out", default=".")
p.add_argument("--tag", default="hf-short")
args = p.parse_args()

import torch  # noqa: E402  (after argparse: --help works without torch)
from transformers import LlamaConfig  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention  # noqa: E402

import bsfa_cupy.hf as hf  # noqa: E402
from bsfa_cupy.tools.benchmark import gpu_name  # noqa: E402
from bsfa_cupy.tools.outputs import check_out_dir, check_tag, result_stem, slug, write_result_files  # noqa: E402

check_tag(args.tag)
check_out_dir(args.out)
hq, hkv = args.heads
dtype = getattr(torch, args.dtype)
cfg = LlamaConfig(hidden_size=hq * args.d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=args.d,
                  num_hidden_layers=1, intermediate_size=64, vocab_size=64)
module = LlamaAttention(cfg, layer_idx=0).to("cuda", dtype).eval()
scale = args.d ** -0.5


def per_call_ms(fn):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(args.calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / args.calls


def bsfa_route(q, k, v, mask):
    if mask is not None and hf._mask_rows(mask, q.shape[0], q.shape[2], k.shape[2]) is None:
        raise RuntimeError("the mask is not the causal pattern the route expects")
    return hf._bsfa(q, k, v, None, scale)


def _recheck(mask, nq, kv):
    mask._bsfa_rows = None  # forget the kept answer: time the check itself
    hf._mask_rows(mask, 1, nq, kv)


rows = []
with torch.inference_mode():
    for kv in args.kv:
        k = torch.randn(1, hkv, kv, args.d, device="cuda", dtype=dtype)
        v = torch.randn(1, hkv, kv, args.d, device="cuda", dtype=dtype)
        for nq in args.q:
            q = torch.randn(1, hq, nq, args.d, device="cuda", dtype=dtype)
            mask = None
            if nq > 1:
                cols = torch.arange(kv, device="cuda")
                mask = (cols[None, :] <= cols[kv - nq:, None])[None, None]
                hf._mask_rows(mask, 1, nq, kv)  # the first layer's check, kept on the mask
            sdpa = lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0]  # noqa: E731
            bsfa = lambda: bsfa_route(q, k, v, mask)  # noqa: E731
            backend = lambda: hf.attention_forward(module, q, k, v, mask, scaling=scale)[0]  # noqa: E731
            want, got = sdpa().float(), bsfa().float()
            err = float((got - want).abs().max() / want.abs().max())
            hf.reset_stats(module)
            backend()
            path = ",".join(hf.stats(module))
            check = (lambda: _recheck(mask, nq, kv)) if mask is not None else None
            row = dict(q=nq, kv=kv, sdpa_ms=per_call_ms(sdpa), bsfa_ms=per_call_ms(bsfa),
                       backend_ms=per_call_ms(backend), backend_path=path, rel_err=err,
                       check_ms=per_call_ms(check) if check else 0.0)
            row["bsfa_over_sdpa"] = row["bsfa_ms"] / row["sdpa_ms"]
            rows.append(row)
            print(f"q={nq:4d} kv={kv:7d}  sdpa {row['sdpa_ms']:.4f}  bsfa {row['bsfa_ms']:.4f} "
                  f"({row['bsfa_over_sdpa']:.2f}x)  backend {row['backend_ms']:.4f} [{path}]  check "
                  f"{row['check_ms']:.4f}  err {err:.1e}",
                  flush=True)
        k = v = None

result = {"gpu": gpu_name(), "date": _dt.date.today().isoformat(), "hq": hq, "hkv": hkv, "head_dim": args.d,
          "dtype": args.dtype, "calls": args.calls, "torch": torch.__version__, "rows": rows}
lines = [f"# {result['gpu']}, {result['date']}: decode steps and short chunks in the transformers backend",
         "", f"B=1, Hq={hq}, Hkv={hkv}, D={args.d}, {args.dtype}; ms per call, back to back, host time included "
         "(torch " + torch.__version__ + "). sdpa: transformers' sdpa_attention_forward; bsfa: dense "
         "bsfa_cupy.attention behind the kept mask check; backend: bsfa_cupy.hf.attention_forward as routed; "
         "check: the mask check once per forward (at the first layer's call), shared by the layers.", "",
         "| q | kv | sdpa ms | bsfa ms | bsfa / sdpa | backend ms (path) | check ms | rel err |",
         "|---:|---:|---:|---:|---:|---|---:|---:|"]
for r in rows:
    lines.append(f"| {r['q']} | {r['kv']} | {r['sdpa_ms']:.4f} | {r['bsfa_ms']:.4f} | {r['bsfa_over_sdpa']:.2f} | "
                 f"{r['backend_ms']:.4f} ({r['backend_path']}) | {r['check_ms']:.4f} | {r['rel_err']:.1e} |")
stem = result_stem(slug(result["gpu"]), result["date"], tag=args.tag)
for path in write_result_files(args.out, stem, result, "\n".join(lines) + "\n", lambda _stem: []):
    print("wrote", path)
