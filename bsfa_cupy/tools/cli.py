"""The ``bsfa`` command line: demo, bench, calibrate, accuracy."""
from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """A user-facing error printed as one line."""


def _demo(args) -> int:
    from .demo import run

    use_gpu = {"auto": None, "gpu": True, "cpu": False}[args.device]
    if use_gpu:
        from .._backend import has_gpu

        if not has_gpu():
            raise CliError("--device gpu: no CUDA GPU visible to CuPy (install bsfa-cupy[cuda12] or [cuda13])")
    run(use_gpu, n=args.n, k=args.k, plot=args.plot, progress=not args.quiet)
    return 0


def _bench(args) -> int:
    from .._backend import has_gpu

    if not has_gpu():
        raise CliError("needs CuPy and a CUDA GPU (install bsfa-cupy[cuda12] or [cuda13])")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CliError("the benchmark times on torch's stream and compares with torch SDPA: install torch") from None
    from .benchmark import Config, run

    cfg = Config(ns=tuple(args.n), ds=tuple(args.d), hkvs=tuple(args.hkv), dtypes=tuple(args.dtype),
                 causal=(True, False) if args.noncausal else (True,), peers=tuple(args.peers),
                 calibrated=not args.no_calibrated, repeats=args.repeats, ours=not args.peers_only)
    result = run(cfg, progress=not args.quiet, out_dir=args.out, tag=args.tag)
    from .benchmark import markdown

    print(markdown(result))
    return 0


def _use_gpu(device: str) -> bool:
    """--device auto|gpu|cpu -> whether to run on the GPU (gpu without one is an error)."""
    from .._backend import has_gpu

    if device == "cpu":
        return False
    if has_gpu():
        return True
    if device == "gpu":
        raise CliError("--device gpu: no CUDA GPU visible to CuPy (install bsfa-cupy[cuda12] or [cuda13])")
    return False


def _calibrate(args) -> int:
    from .dumps import calibrate_dumps

    use_gpu = _use_gpu(args.device)
    prov = {"model": args.model} if args.model else {}
    thr, n_dumps = calibrate_dumps(args.dumps, args.k, reduce=args.reduce, causal=args.causal,
                                   softmax_scale=args.softmax_scale, use_gpu=use_gpu, progress=not args.quiet,
                                   provenance=prov)
    path = thr.save(args.out)
    plural = lambda n, what: f"{n} {what}" + ("s" if n != 1 else "")  # noqa: E731
    print(f"wrote {path}: {plural(thr.num_layers, 'layer')} x {plural(thr.num_heads, 'head')} x "
          f"T={thr.num_positions} query-tile positions, "
          f"k = {' '.join(map(str, thr.k_values))}, {plural(int(thr.provenance['samples']), 'sample')} from {plural(n_dumps, 'dump')} "
          f"({args.reduce}, {'causal' if args.causal else 'non-causal'}, {'GPU' if use_gpu else 'CPU reference'})")
    return 0


def _accuracy(args) -> int:
    from .accuracy import Config, markdown, run

    use_gpu = _use_gpu(args.device)
    cfg = Config.for_device(use_gpu, ns=args.n, ks=args.k, calib_samples=args.calib_samples)
    result, paths = run(cfg, use_gpu=use_gpu, progress=not args.quiet, out_dir=args.out, tag=args.tag)
    print(markdown(result))
    for p in paths:
        print(f"wrote {p}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr (no usage block), exit code 2, like the other errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bsfa", description="Block-Sparse FlashAttention on CuPy / PyTorch / JAX arrays")
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
    b.add_argument("--peers-only", action="store_true", help="time only the peers (e.g. FlexAttention on a few shapes)")
    b.add_argument("--repeats", type=_positive, default=7)
    b.add_argument("--out", default="bench/results", help="folder for the JSON/markdown/PNG results")
    b.add_argument("--tag", default="", help="suffix for the result file names")
    b.add_argument("--quiet", action="store_true", help="no progress bar (prints each row instead)")
    b.set_defaults(func=_bench)

    from .dumps import FORMAT

    c = sub.add_parser("calibrate", help="calibrate thresholds for a whole model from dumps of its post-RoPE q/k",
                       description="Calibrate BSFA thresholds per (layer, head, query-tile position) for several "
                       "k from dumps of a model's post-RoPE queries and keys, and write them as a Thresholds .npz "
                       "(load with bsfa_cupy.Thresholds.load).", epilog=FORMAT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("dumps", nargs="+", help=".npz dumps, folders of .npy dumps, or folders holding them")
    c.add_argument("--k", type=_positive, nargs="+", default=[16, 32, 64, 96],
                   help="off-diagonal key tiles to keep per query tile (default: 16 32 64 96)")
    c.add_argument("--out", default="thresholds.npz", help="output file (default: thresholds.npz)")
    c.add_argument("--reduce", choices=("mean", "median"), default="mean", help="over samples (default: mean)")
    c.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: bsfa_cupy.Calibrator when CuPy and a GPU are present, else the NumPy reference")
    mask = c.add_mutually_exclusive_group()
    mask.add_argument("--causal", dest="causal", action="store_true", default=True, help="causal mask (default)")
    mask.add_argument("--non-causal", dest="causal", action="store_false", help="no mask")
    c.add_argument("--softmax-scale", type=float, default=None, help="score scale (default 1/sqrt(head_dim))")
    c.add_argument("--model", default="", help="model name recorded in the file's provenance")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_calibrate)

    a = sub.add_parser("accuracy", help="block-sparse vs dense at the attention level as functions of k and N",
                       description="Relative output error, attention mass dropped, needle retrieval and kept "
                       "density of calibrated block-sparse attention against dense, on synthetic long-context "
                       "inputs; thresholds calibrated on separate samples. Writes JSON, markdown and PNG.")
    a.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU kernel when CuPy and a GPU are present, else the NumPy reference")
    a.add_argument("--n", type=_positive, nargs="+", default=None,
                   help="sequence lengths (default 4096..65536 on GPU, 1024 2048 4096 on CPU)")
    a.add_argument("--k", type=_positive, nargs="+", default=[16, 32, 64, 96, 128])
    a.add_argument("--calib-samples", type=_positive, default=None, help="calibration samples per N")
    a.add_argument("--out", default="bench/results", help="folder for the JSON/markdown/PNG results")
    a.add_argument("--tag", default="", help="suffix for the result file names")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_accuracy)
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
    except (CliError, ValueError, TypeError, OSError, ImportError) as exc:  # OSError: FileNotFoundError & co
        print(f"bsfa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
