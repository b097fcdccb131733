"""``bsfa calibrate-model``: thresholds from a transformers model running on text files.

The same code path as ``bsfa_cupy.hf.calibrate`` (the model's own forward feeds the calibrators);
this module only loads the model and the texts and checks every argument before any work.
"""
from __future__ import annotations

import os
from pathlib import Path


class ModelInputError(ValueError):
    """A model folder, GGUF file or text file that cannot be used, named in the message."""


def check_inputs(folder, gguf, texts, tokens) -> tuple[Path, Path | None, list[Path]]:
    """The model folder, the GGUF file inside it (or None) and the text files, all checked to exist."""
    root = Path(folder)
    if not root.is_dir():
        raise ModelInputError(f"{folder}: expected a model folder (config and weights, or a .gguf file), got "
                              f"{'a file' if root.exists() else 'no such folder'}")
    gguf_path = None
    if gguf is not None:
        gguf_path = root / gguf
        if Path(gguf).name != gguf or not gguf_path.is_file():
            raise ModelInputError(f"--gguf {gguf}: expected the name of a file inside {folder}, got "
                                  f"{'a path' if Path(gguf).name != gguf else 'no such file'}")
    paths = []
    for t in texts:
        p = Path(t)
        if not p.is_file():
            raise ModelInputError(f"{t}: expected a text file, got {'a folder' if p.is_dir() else 'no such file'}")
        paths.append(p)
    if tokens < 128:
        raise ModelInputError(f"--tokens: expected at least 128 (one query tile), got {tokens}")
    return root, gguf_path, paths


def load(root: Path, gguf_path: Path | None, device: str):
    """(tokenizer, model) from a local folder, offline; float32 on the CPU, bfloat16 on a GPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"bsfa calibrate-model needs torch and transformers >= 5 ({exc}): "
                          "pip install 'bsfa-cupy[hf]'") from None
    kw = {"gguf_file": gguf_path.name} if gguf_path is not None else {}
    try:
        tok = AutoTokenizer.from_pretrained(root, **kw)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, **kw).to(device).eval()
    except (OSError, ValueError, KeyError) as exc:
        what = gguf_path or root
        raise ModelInputError(f"{what}: not a model transformers can load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return tok, model


def batches(tok, paths: list[Path], tokens: int, device: str) -> list:
    """One (1, <= tokens) input_ids tensor per text file."""
    out = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ModelInputError(f"{p}: expected UTF-8 text") from None
        ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
        if ids.shape[1] < 128:
            raise ModelInputError(f"{p}: expected at least 128 tokens (one query tile), got {ids.shape[1]}")
        out.append(ids.to(device))
    return out


def run(folder, gguf, texts, k_values, *, tokens, device, progress):
    """Calibrate and return (Thresholds, number of samples)."""
    root, gguf_path, paths = check_inputs(folder, gguf, texts, tokens)
    tok, model = load(root, gguf_path, device)
    import torch

    from .. import hf

    with torch.inference_mode():
        thr = hf.calibrate(model, batches(tok, paths, tokens, device), k_values, progress=progress)
    return thr, len(paths)
