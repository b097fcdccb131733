"""bench/context_parallel.py runs under torchrun, whose own parser reads the whole command line: an option of
the script that abbreviates one of torchrun's (``--n`` for ``--nnodes``/``--nproc-per-node``, ``--d`` for
``--duplicate-stdout-filters``) stops the launch before the script starts. Every option of the script, as
bench/README.md's command writes them, must reach the script unchanged."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench_scripts import load_bench_script

run = pytest.importorskip("torch.distributed.run")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "context_parallel.py"


def _load():
    return load_bench_script("context_parallel")


def _script_options(parser):
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def test_every_option_passes_through_torchrun():
    bench = _load()
    options = _script_options(bench.build_parser())
    assert "--seqlen" in options and "--head-dim" in options, options
    launcher = run.get_args_parser()
    for opt in options:
        script_args = [opt, "1"]
        try:
            got = launcher.parse_args(["--standalone", "--nproc-per-node", "2", str(SCRIPT), *script_args])
        except SystemExit as exc:  # argparse's error exit: the launch would stop here
            raise AssertionError(f"torchrun rejects the script option {opt!r} (exit {exc.code})") from None
        assert got.training_script_args == script_args, (
            f"torchrun took {opt!r} for itself: expected script args {script_args}, got {got.training_script_args}")


def test_documented_command_parses():
    bench = _load()
    argv = ["--seqlen", "32768", "131072", "--rho", "0.25", "--repeats", "5", "--head-dim", "128",
            "--dtype", "bfloat16", "--layout", "contiguous", "--out", "O", "--tag", "cp2"]
    got = run.get_args_parser().parse_args(["--standalone", "--nproc-per-node", "2", str(SCRIPT), *argv])
    assert got.training_script_args == argv
    args = bench.parse_args(got.training_script_args)
    assert (args.seqlen, args.rho, args.repeats, args.head_dim) == ([32768, 131072], [0.25], 5, 128)
    assert (args.dtype, args.layout, args.out, args.tag) == ("bfloat16", "contiguous", "O", "cp2")
