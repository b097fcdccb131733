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
