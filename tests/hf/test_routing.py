"""Routing, counters and argument checks of the transformers backend on tiny random models (no files).

On CPU tensors the BSFA paths run the float64 reference on float32 inputs, so where BSFA and the
float32 SDPA must agree the tolerance is float32's (1e-5 relative), and where two BSFA runs see the
same inputs they agree exactly.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import bsfa_cupy  # noqa: E402
import bsfa_cupy.hf as hf  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16


def _config(**kw):
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                       max_position_embeddings=1024, **kw)


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def _ids(b, n, seed=1):
    return torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _close(a, b, rtol=1e-5):
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


def _qkv(nq, nk, b=1, requires_grad=False):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(b, HEADS, nq, HEAD_DIM, generator=g).requires_grad_(requires_grad)
    return q, torch.randn(b, KV_HEADS, nk, HEAD_DIM, generator=g), torch.randn(b, KV_HEADS, nk, HEAD_DIM, generator=g)


def _thresholds(layers=LAYERS, heads=HEADS, k_values=(1, 2), causal=True, provenance=None):
    values = np.zeros((len(k_values), layers, heads, 4), np.float32)
    return bsfa_cupy.Thresholds(values, list(k_values), causal=causal, provenance=provenance)


# ------------------------------------------------------------------ registration and selection
def test_register_is_idempotent_and_selectable_at_load():
    assert hf.register() == hf.register() == "bsfa"
    assert AttentionInterface._global_mapping["bsfa"] is hf.attention_forward
    model = LlamaForCausalLM._from_config(_config(), attn_implementation="bsfa").eval()
    assert model.config._attn_implementation == "bsfa"
    _logits(model, _ids(1, 200))
    assert hf.stats(model) == {"bsfa": LAYERS}


@pytest.mark.parametrize("name, error", [("flash_bsfa", ValueError), ("org/bsfa", ValueError), ("", ValueError),
                                         (3, TypeError)])
def test_register_refuses_names_transformers_treats_specially(name, error):
    with pytest.raises(error, match="expected"):
        hf.register(name)


def test_enable_registers_a_name_not_registered_yet(llama):
    name = "bsfa_enable_first"
    assert name not in AttentionInterface._global_mapping
    hf.enable(llama, name=name)
    assert llama.config._attn_implementation == name
    _logits(llama, _ids(1, 200))
    assert hf.stats(llama) == {"bsfa": LAYERS}


# ------------------------------------------------------------------ model-level paths
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # renamed in 5.x; both work
def test_dense_prefill_chunked_prefill_and_static_cache_equal_one_forward(llama):
    from transformers import DynamicCache, StaticCache

    ids = _ids(1, 350)
    ref = _logits(llama, ids)  # SDPA
    hf.enable(llama)
    full = _logits(llama, ids)
    assert _close(full, ref) and hf.stats(llama) == {"bsfa": LAYERS}
    hf.reset_stats(llama)
    cache = DynamicCache(config=llama.config)
    # the second chunk (150 queries on 350 keys) arrives with a materialised causal mask
    chunks = [_logits(llama, ids[:, :200], past_key_values=cache), _logits(llama, ids[:, 200:], past_key_values=cache)]
    assert torch.equal(torch.cat(chunks, 1), full) and hf.stats(llama) == {"bsfa": 2 * LAYERS}
    hf.reset_stats(llama)
    # an empty static cache hands 512 keys without a mask; only the first 350 are written
    static = _logits(llama, ids, past_key_values=StaticCache(config=llama.config, max_cache_len=512))
    assert torch.equal(static, full) and hf.stats(llama) == {"bsfa": LAYERS}


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_alone_and_padding_outputs_zero(llama, side):
    hf.enable(llama, _thresholds(), k=1)  # zero thresholds: sparse, so the rows' own tiling matters
    lengths = (300, 180)
    ids, mask = _ids(2, 300), torch.zeros((2, 300), dtype=torch.long)
    for b, n in enumerate(lengths):
        (mask[b, 300 - n:] if side == "left" else mask[b, :n]).fill_(1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = _logits(llama, ids, attention_mask=mask, position_ids=pos)
    assert hf.stats(llama) == {"bsfa_padded": LAYERS}
    for b in range(2):
        real = mask[b].bool()
        alone = _logits(llama, ids[b:b + 1, real])
        assert torch.equal(batch[b, real], alone[0])


def test_padded_rows_attention_outputs_are_zero_at_padding(llama):
    attn = llama.model.layers[0].self_attn
    from transformers.masking_utils import sdpa_mask

    q, k, v = _qkv(200, 200, b=2)

    pad = torch.ones(2, 200, dtype=torch.bool)
    pad[1, :60] = False
    mask = sdpa_mask(batch_size=2, q_length=200, kv_length=200, attention_mask=pad)
    out, _ = hf.attention_forward(attn, q, k, v, mask, scaling=0.25)
    assert out.shape == (2, 200, HEADS, HEAD_DIM)
    assert torch.equal(out[1, :60], torch.zeros_like(out[1, :60]))
    ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=0.25)
    assert _close(out[:, 60:], ref[:, 60:])


def test_generate_prefills_padded_on_bsfa_and_decodes_on_sdpa(llama):
    hf.enable(llama)
    ids, mask = _ids(2, 200), torch.ones((2, 200), dtype=torch.long)
    mask[1, :40] = 0  # left padding, as generate expects for decoder-only models
    with torch.no_grad():
        out = llama.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 203)
    assert hf.stats(llama) == {"bsfa_padded": LAYERS, "sdpa_decode": 2 * LAYERS}


def test_softcap_runs_the_models_eager_attention():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                       layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0)
    model = Gemma2ForCausalLM(cfg).eval()
    ids = _ids(1, 200)
    model.set_attn_implementation("eager")
    ref = _logits(model, ids)
    hf.enable(model)
    assert torch.equal(_logits(model, ids), ref)
    assert hf.stats(model) == {"eager_softcap": 2}


# ------------------------------------------------------------------ single calls: every fallback
@pytest.mark.parametrize("path, nq, nk, mask, kwargs", [
    ("bsfa", 200, 200, None, {}),
    ("sdpa_not_causal", 200, 200, None, {"is_causal": False}),
    ("sdpa_sliding_window", 200, 200, None, {"sliding_window": 64}),
    ("sdpa_dropout", 200, 200, None, {"dropout": 0.1}),
    ("sdpa_grad", 200, 200, None, {"requires_grad": True}),
    ("sdpa_decode", 1, 200, None, {}),
    ("sdpa_short", 100, 100, None, {}),
    ("sdpa_mask", 200, 200, "float", {}),
    ("sdpa_mask", 200, 200, "full", {}),  # a bool mask that is not causal
])
def test_each_call_is_routed_and_counted(llama, path, nq, nk, mask, kwargs):
    attn = llama.model.layers[0].self_attn
    q, k, v = _qkv(nq, nk, requires_grad=kwargs.pop("requires_grad", False))
    if mask == "float":
        mask = torch.zeros(1, 1, nq, nk)
    elif mask == "full":
        mask = torch.ones(1, 1, nq, nk, dtype=torch.bool)
    dropout = kwargs.pop("dropout", 0.0)
    torch.manual_seed(3)
    out, weights = hf.attention_forward(attn, q, k, v, mask, scaling=0.25, dropout=dropout, **kwargs)
    torch.manual_seed(3)
    ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=0.25, dropout=dropout, **kwargs)
    assert weights is None and out.shape == (1, nq, HEADS, HEAD_DIM) and out.dtype == q.dtype
    assert _close(out.detach(), ref.detach())
    assert hf.stats(llama) == {path: 1}
    hf.reset_stats(llama)
    assert hf.stats(llama) == {}


def test_attention_sinks_are_refused_not_dropped(llama):
    attn = llama.model.layers[0].self_attn
    q, k, v = _qkv(200, 200)
    with pytest.raises(ValueError, match="attention sinks .* attn_implementation='eager'"):
        hf.attention_forward(attn, q, k, v, None, scaling=0.25, s_aux=torch.zeros(HEADS))
    attn.sinks = torch.zeros(HEADS)
    try:
        with pytest.raises(ValueError, match="attention sinks"):
            hf.attention_forward(attn, q, k, v, None, scaling=0.25)
    finally:
        del attn.sinks


# ------------------------------------------------------------------ enable and calibrate: arguments
def test_enable_checks_thresholds_against_the_model(llama):
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        hf.enable(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a bsfa_cupy.Thresholds"):
        hf.enable(llama, np.zeros((HEADS, 4)), k=1)
    with pytest.raises(ValueError, match="expected None without thresholds"):
        hf.enable(llama, None, k=1)
    with pytest.raises(TypeError, match=r"k: expected an int, one of the k values \[1, 2\], got NoneType"):
        hf.enable(llama, _thresholds())
    with pytest.raises(ValueError, match=r"k: expected one of the k values \[1, 2\], got 3"):
        hf.enable(llama, _thresholds(), k=3)
    with pytest.raises(ValueError, match="expected 2 layers"):
        hf.enable(llama, _thresholds(layers=3), k=1)
    with pytest.raises(ValueError, match="expected 4 query heads"):
        hf.enable(llama, _thresholds(heads=2), k=1)
    with pytest.raises(ValueError, match="calibrated with the causal mask"):
        hf.enable(llama, _thresholds(causal=False), k=1)
    with pytest.raises(ValueError, match="expected softmax_scale 0.25"):
        hf.enable(llama, _thresholds(provenance={"softmax_scale": "0.125"}), k=1)
    assert llama.config._attn_implementation == "sdpa"  # nothing selected by a refused call
    for m in llama.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    with pytest.raises(ValueError, match="expected a causal decoder"):
        hf.enable(llama, _thresholds(), k=1)


def test_calibrate_returns_thresholds_for_every_layer_and_restores_attention(llama):
    thr = hf.calibrate(llama, [_ids(1, 300), _ids(2, 256, seed=4)], k_values=[1, 2], progress=False)
    assert (thr.num_layers, thr.num_heads, thr.k_values, thr.causal) == (LAYERS, HEADS, (1, 2), True)
    assert thr.provenance["samples"] == "3" and thr.provenance["lengths"] == "300,256,256"
    assert thr.provenance["softmax_scale"] == repr(HEAD_DIM ** -0.5)
    assert llama.config._attn_implementation == "sdpa"
    assert hf.stats(llama) == {"calibrate": 2 * LAYERS}
    first = hf.calibrate(llama, [_ids(1, 300), _ids(1, 300)], [1], samples=1, progress=False)
    assert first.provenance["samples"] == "1" and first.provenance["lengths"] == "300"
    hf.enable(llama, thr, k=1)
    hf.reset_stats(llama)
    _logits(llama, _ids(1, 300, seed=5))
    assert hf.stats(llama) == {"bsfa": LAYERS}


@pytest.mark.parametrize("batches, error, match", [
    ([torch.zeros(1, 8)], TypeError, "expected integer input_ids"),
    ([[1, 2, 3]], TypeError, "expected a LongTensor"),
    ([torch.zeros(1, 1, 8, dtype=torch.long)], ValueError, r"expected shape \(B, N\)"),
    ([], ValueError, "expected at least one batch"),
])
def test_calibrate_refuses_bad_batches(llama, batches, error, match):
    with pytest.raises(error, match=match):
        hf.calibrate(llama, batches, [1], progress=False)
    assert llama.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------ short chunks: the CUDA route, decided on the host
def _cuda_like(B, H, N, dtype=torch.float16, D=64):
    """What _route reads of a CUDA tensor, without a GPU."""
    return types.SimpleNamespace(shape=(B, H, N, D), device=torch.device("cuda"), dtype=dtype, requires_grad=False)


def _bottom_right(B, nq, nk, real=None):
    cols = torch.arange(nk)
    mask = (cols[None, :] <= cols[nk - nq:, None])[None].expand(B, nq, nk)
    if real is not None:
        mask = mask & real[:, None, :]
    return mask[:, None]


@pytest.mark.parametrize("nq", [1, 2, 64, 127])
def test_short_chunks_over_a_long_cache_route_to_dense_bsfa(llama, monkeypatch, nq):
    monkeypatch.setattr(hf, "DECODE_MIN_KV", hf.SHORT_MIN_KV)
    attn = llama.model.layers[0].self_attn
    name = "decode" if nq == 1 else "short"
    long, short_cache = hf.SHORT_MIN_KV, hf.SHORT_MIN_KV - 1
    q = _cuda_like(2, HEADS, nq)

    def route(nk, mask):
        return hf._route(attn, q, _cuda_like(2, KV_HEADS, nk), mask, 0.0, {})

    assert route(long, _bottom_right(2, nq, long)) == "bsfa_" + name
    assert route(short_cache, _bottom_right(2, nq, short_cache)) == "sdpa_" + name
    real = torch.ones(2, long, dtype=torch.bool)
    real[1, :10] = False
    assert route(long, _bottom_right(2, nq, long, real)) == "sdpa_" + name, "padding stays on SDPA"
    assert route(long, torch.ones(2, 1, nq, long, dtype=torch.bool)) == ("sdpa_mask" if nq > 1 else "bsfa_decode")
    # no mask: a decode step sees every key (as SDPA's unmasked call); a longer chunk without a mask comes only
    # from an empty static cache, whose keys past q_len are unwritten
    assert route(long, None) == ("bsfa_decode" if nq == 1 else "sdpa_short")
    assert hf._route(attn, _cuda_like(2, HEADS, nq, torch.float32), _cuda_like(2, KV_HEADS, long), None, 0.0,
                     {}) == "sdpa_dtype"


def test_decode_stays_on_sdpa_by_default(llama):
    attn = llama.model.layers[0].self_attn
    assert hf.DECODE_MIN_KV == math.inf
    assert hf._route(attn, _cuda_like(1, HEADS, 1), _cuda_like(1, KV_HEADS, 1 << 20), None, 0.0, {}) == "sdpa_decode"


def test_short_chunks_on_the_cpu_stay_on_sdpa(llama):
    attn = llama.model.layers[0].self_attn
    q, k, v = _qkv(5, hf.SHORT_MIN_KV + 10)
    assert hf._route(attn, q, k, _bottom_right(1, 5, hf.SHORT_MIN_KV + 10), 0.0, {}) == "sdpa_short"


def test_the_mask_is_checked_once_and_the_answer_kept_on_it(llama, monkeypatch):
    """The first route of a mask compares it (_causal_rows) and keeps the answer on it; later routes (the other
    layers) read it, unless the mask was written in place since."""
    attn = llama.model.layers[0].self_attn
    nk = hf.SHORT_MIN_KV + 3
    mask = _bottom_right(2, 5, nk).clone()
    calls = []
    real = hf._causal_rows
    monkeypatch.setattr(hf, "_causal_rows", lambda *a: calls.append(a) or real(*a))
    q, k = _cuda_like(2, HEADS, 5), _cuda_like(2, KV_HEADS, nk)
    for _ in range(3):
        assert hf._route(attn, q, k, mask, 0.0, {}) == "bsfa_short"
    assert len(calls) == 1
    mask[1, 0, :, :4] = False  # padding written in place: seen
    assert hf._route(attn, q, k, mask, 0.0, {}) == "sdpa_short" and len(calls) == 2
    full = torch.ones(1, 1, 200, 200, dtype=torch.bool)
    q2, k2 = _cuda_like(2, HEADS, 200), _cuda_like(2, KV_HEADS, 200)
    assert [hf._route(attn, q2, k2, full, 0.0, {}) for _ in range(2)] == ["sdpa_mask"] * 2
    assert len(calls) == 3, "a kept 'not causal' answer is read too"


def test_a_padded_forward_checks_its_mask_once(llama, monkeypatch):
    """A padded batch through the model: one mask check for all layers, and the padded path taken in each."""
    calls = []
    real = hf._causal_rows
    monkeypatch.setattr(hf, "_causal_rows", lambda *a: calls.append(a) or real(*a))
    hf.enable(llama)
    hf.reset_stats(llama)
    ids = torch.randint(0, 100, (2, 160))
    pad = torch.ones(2, 160, dtype=torch.long)
    pad[1, :7] = 0
    with torch.no_grad():
        llama(input_ids=ids, attention_mask=pad)
    assert len(calls) == 1 and hf.stats(llama) == {"bsfa_padded": LAYERS}


def test_a_mask_made_in_inference_mode_is_checked_once_too(llama, monkeypatch):
    attn = llama.model.layers[0].self_attn
    nk = hf.SHORT_MIN_KV + 3
    q, k = _cuda_like(1, HEADS, 5), _cuda_like(1, KV_HEADS, nk)
    with torch.inference_mode():
        mask = _bottom_right(1, 5, nk).clone()
        assert hf._route(attn, q, k, mask, 0.0, {}) == "bsfa_short"
        monkeypatch.setattr(hf, "_causal_rows", lambda *a: pytest.fail("checked again"))
        assert hf._route(attn, q, k, mask, 0.0, {}) == "bsfa_short"
