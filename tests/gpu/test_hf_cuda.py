"""The transformers backend's CUDA path for padded batches: one packed attention_varlen call, each row's
real queries exactly its own call's output, padding rows zero."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.gpu import requires_gpu, without_head_pairs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")

import bsfa_cupy  # noqa: E402
import bsfa_cupy.hf as hf  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")]

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 64


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval().to("cuda", torch.float16)


@pytest.mark.parametrize("gated", [False, True])
def test_padded_rows_are_their_own_calls_and_padding_is_zero(monkeypatch, gated):
    from transformers.masking_utils import sdpa_mask

    # each row bit for bit its own call on the packed kernel's arithmetic (not bsfa_fwd_headpair's 64-key blocks)
    without_head_pairs(monkeypatch)

    model = _model()
    if gated:  # zero thresholds: sparse, so each row's own tiling and positions matter
        values = np.zeros((1, LAYERS, HEADS, 8), np.float32)
        hf.enable(model, bsfa_cupy.Thresholds(values, [1], causal=True), k=1)
    attn = model.model.layers[0].self_attn
    B, N = 4, 400
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, HEADS, N, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(B, KV_HEADS, N, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(B, KV_HEADS, N, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    real = torch.ones(B, N, dtype=torch.bool, device="cuda")
    real[1, :271] = False  # left padding: 129 real rows
    real[2, 128:] = False  # right padding: one full tile
    real[3, :399] = False  # one real row
    mask = sdpa_mask(batch_size=B, q_length=N, kv_length=N, attention_mask=real)
    hf.reset_stats(model)
    with torch.inference_mode():
        out, _ = hf.attention_forward(attn, q, k, v, mask, scaling=0.125)
    assert hf.stats(model) == {"bsfa_padded": 1}
    assert out.shape == (B, N, HEADS, HEAD_DIM)
    assert not out[~real].any(), f"{int((out[~real] != 0).sum())} nonzero outputs at padded positions"
    thr = hf._layer_thresholds(getattr(attn, "_bsfa_state", None), attn, q)
    for b in range(B):
        r = real[b]
        with torch.inference_mode():
            alone = bsfa_cupy.attention(q[b:b + 1, :, r].transpose(1, 2), k[b:b + 1, :, r].transpose(1, 2),
                                        v[b:b + 1, :, r].transpose(1, 2), thr, softmax_scale=0.125)
        diff = (out[b, r].float() - alone[0].float()).abs()
        assert torch.equal(out[b, r], alone[0]), (
            f"row {b}: the packed call differs from the row's own call (worst {float(diff.max()):.3e}, "
            f"{int((diff > 0).sum())} entries)"
        )


@pytest.mark.parametrize("nq", [1, 5, 127])
def test_short_chunks_over_a_cache_run_dense_bsfa(monkeypatch, nq):
    """Few new queries over a long cache (the mask transformers builds there): dense BSFA even with thresholds
    enabled (they would over-skip a tile of few rows), the output within SDPA's rounding; SDPA where there is
    padding. DECODE_MIN_KV lowered so that a decode step takes the route too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(hf, "DECODE_MIN_KV", hf.SHORT_MIN_KV)
    model = _model()
    values = np.full((1, LAYERS, HEADS, 64), 1e9, np.float32)  # would skip every gated tile
    hf.enable(model, bsfa_cupy.Thresholds(values, [1], causal=True), k=1)
    attn = model.model.layers[0].self_attn
    Nk = hf.SHORT_MIN_KV + 77
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(2, HEADS, nq, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(2, KV_HEADS, Nk, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(2, KV_HEADS, Nk, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
    real = torch.ones(2, Nk, dtype=torch.bool, device="cuda")
    for padded in (False, True):
        if padded:
            real[1, :300] = False
        # what transformers' sdpa_mask gives after prefill: none for an unpadded decode step, else bottom-right
        # causal over the real keys
        cols = torch.arange(Nk, device="cuda")
        mask = ((cols[None, :] <= cols[Nk - nq:, None])[None] & real[:, None, :])[:, None]
        if nq == 1 and not padded:
            mask = None
        hf.reset_stats(model)
        with torch.inference_mode():
            out, _ = hf.attention_forward(attn, q, k, v, mask, scaling=0.125)
            ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=0.125)
        path = ("sdpa_" if padded else "bsfa_") + ("decode" if nq == 1 else "short")
        assert hf.stats(model) == {path: 1}, f"mask {None if mask is None else tuple(mask.shape)}"
        err = float((out.float() - ref.float()).abs().max())
        assert err <= 4e-3 * float(ref.float().abs().max()), f"{path}: worst |bsfa - sdpa| {err:.2e}"
