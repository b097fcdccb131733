"""The ``bsfa`` command line: demo (more subcommands arrive with calibration and benchmarks)."""
from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """A user-facing error printed as one line."""


def _demo(args) -> int:
    from .demo import run

    use_gpu = {"auto": None, "gpu": True, "cpu": False}[args.device]
    if use_gpu:
        from ._backend import has_gpu

        if not has_gpu():
            raise CliError("--device gpu: no CUDA GPU visible to CuPy (install bsfa-cupy[cuda12] or [cuda13])")
    run(use_gpu, n=args.n, k=args.k, plot=args.plot, progress=not args.quiet)
    return 0


def _bench(args) -> int:
    from ._backend import has_gpu

    if not has_gpu():
        raise CliError("needs CuPy and a CUDA GPU (install bsfa-cupy[cuda12] or [cuda13])")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CliError("the benchmark times on torch's stream and compares with torch SDPA: install torch") from None
    from .benchmark import Config, run

    cfg = Config(ns=tuple(args.n), ds=tuple(args.d), hkvs=tuple(args.hkv), dtypes=tuple(args.dtype),
                 causal=(True, False) if args.noncausal else (True,), peers=tuple(args.peers),
                 calibrated=not args.no_calibrated, repeats=args.repeats)
    result = run(cfg, progress=not args.quiet, out_dir=args.out, tag=args.tag)
    from .benchmark import markdown

    print(markdown(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bsfa", description="Block-Sparse FlashAttention on CuPy / PyTorch / JAX arrays")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="calibrate on synthetic long-context data, then compare dense and block-sparse")
    d.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU kernel when CuPy and a GPU are present, else the NumPy reference")
    d.add_argument("--n", type=_positive, default=None, help="sequence length (default 16384 on GPU, 2048 on CPU)")
    d.add_argument("--k", type=_positive, default=None, help="off-diagonal tiles to keep per query tile in calibration")
    d.add_argument("--plot", metavar="PNG", default=None, help="write a heatmap of head 0's kept tiles")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    from .benchmark import IMPLS

    b = sub.add_parser("bench", help="time our kernel (dense, sparse, calibrated) against torch SDPA and FlexAttention")
    b.add_argument("--n", type=_positive, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    b.add_argument("--d", type=int, nargs="+", choices=(64, 128), default=[64, 128])
    b.add_argument("--hkv", type=_positive, nargs="+", default=[8, 32])
    b.add_argument("--dtype", nargs="+", choices=("float16", "bfloat16"), default=["float16", "bfloat16"])
    b.add_argument("--peers", nargs="*", choices=[i for i in IMPLS if not i.startswith("bsfa")],
                   default=["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"])
    b.add_argument("--noncausal", action="store_true", help="also time non-causal rows")
    b.add_argument("--no-calibrated", action="store_true", help="skip the calibrated-thresholds row")
    b.add_argument("--repeats", type=_positive, default=7)
    b.add_argument("--out", default="bench/results", help="folder for the JSON/markdown/PNG results")
    b.add_argument("--tag", default="", help="suffix for the result file names")
    b.add_argument("--quiet", action="store_true", help="no progress bar (prints each row instead)")
    b.set_defaults(func=_bench)
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"bsfa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
