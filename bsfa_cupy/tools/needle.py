"""Needle retrieval for ``bsfa quality``: does the model still find one fact in a long text under BSFA?

A trial is one (1, N) token sequence: essay text with a needle sentence ("The secret number of
<city> is <7 digits>.") inserted at a depth (share of the text before it), then the question and the
answer prefix, then the answer's tokens. The model retrieves the needle when every answer token is
its top-1 prediction given the tokens before (teacher forcing: exactly what greedy decoding would
produce first, measured in one forward). BSFA gates the whole forward, answer rows included.
"""
from __future__ import annotations

import numpy as np

CITIES = ("Lisbon", "Oslo", "Quito", "Hanoi", "Nairobi", "Tbilisi")
DEPTHS = (0.1, 0.5, 0.9)


def trials(tok, haystack_ids, n: int, depths=DEPTHS, per_depth: int = 2, seed: int = 0) -> list[dict]:
    """``len(depths) * per_depth`` trials of exactly ``n`` tokens from ``haystack_ids`` (1-D LongTensor).

    Each: {"depth", "city", "number", "ids" (1, n), "answer" (positions of the answer tokens)}.
    """
    import torch

    rng = np.random.default_rng(seed + n)
    out = []
    for d in depths:
        for j in range(per_depth):
            city = CITIES[(len(out)) % len(CITIES)]
            number = str(int(rng.integers(1_000_000, 10_000_000)))
            needle = _ids(tok, f" The secret number of {city} is {number}. ")
            question = _ids(tok, f"\n\nQuestion: What is the secret number of {city}?\nAnswer: The secret number "
                                 f"of {city} is")
            answer = _ids(tok, f" {number}")
            room = n - len(needle) - len(question) - len(answer)
            if room < 1 or haystack_ids.numel() < room:
                raise ValueError(f"needle at N={n}: expected a haystack of at least {max(room, 1)} tokens, got "
                                 f"{haystack_ids.numel()}")
            cut = int(round(d * room))
            ids = torch.cat([haystack_ids[:cut], needle, haystack_ids[cut:room], question, answer])[None]
            out.append({"depth": d, "city": city, "number": number, "ids": ids,
                        "answer": list(range(n - len(answer), n))})
    return out


def _ids(tok, text: str):
    import torch

    return torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)


def retrieved(logits, trial) -> bool:
    """Whether every answer token is the top-1 prediction of the position before it."""
    pos = trial["answer"]
    want = trial["ids"][0, pos].to(logits.device)
    got = logits[0, [p - 1 for p in pos]].argmax(-1)
    return bool((got == want).all())
