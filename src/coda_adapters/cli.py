"""The ``coda`` command line (also ``python -m coda_adapters``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CommandError(Exception):
    """A problem with the user's input: printed as one line, without a traceback."""


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time CoDA against the dense parallel adapter, the frozen model and merged LoRA",
        description="Time forwards (or training steps with --train) side by side, settings interleaved.",
    )
    parser.add_argument("--model", default="minilm", help="bundled model name or local model directory")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--reductions", type=float, nargs="+", default=[1, 3, 5])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bottleneck", type=int, default=64)
    parser.add_argument("--train", action="store_true", help="time forward + backward + AdamW step")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8"],
        help="int8 dynamic quantisation of the frozen layers' linear layers",
    )
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-length padded batches")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--plot", help="write a speed-up plot (PNG) to this file")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from .bench import format_table, plot_speedups, run_benchmark, write_json

    rows = run_benchmark(
        model_name=args.model,
        seq_lens=args.seq_lens,
        reductions=args.reductions,
        batch_size=args.batch_size,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        train=args.train,
        quantize=args.quantize,
        mixed=not args.no_mixed,
        bottleneck=args.bottleneck,
    )
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(rows, args.plot)
        print(f"wrote {args.plot}")


def add_bench_soft_topk_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-soft-topk",
        help="soft top-k: error against a float64 reference and cost, exact vs the paper's solver",
    )
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the report to this JSON file")
    parser.set_defaults(run=run_bench_soft_topk)


def run_bench_soft_topk(args: argparse.Namespace) -> None:
    from .bench import soft_topk_report

    if not 1 <= args.k <= args.n:
        raise CommandError(f"--k must be in [1, --n={args.n}], got {args.k}")
    report = soft_topk_report(n=args.n, batch=args.batch_size, k=args.k, repeats=args.repeats, threads=args.threads)
    print(f"n = {report['n']}, k = {report['k']}, batch = {report['batch']}; scores ~ N(0, 1)")
    print(f"{'epsilon':>8} {'exact max err':>14} {'CD max err':>11} {'exact min sum':>14} {'CD min sum':>11}")
    for row in report["errors"]:
        print(
            f"{row['epsilon']:>8g} {row['exact_max_error']:>14.2e} {row['coordinate_descent_max_error']:>11.2e} "
            f"{row['exact_min_row_sum']:>14.3f} {row['coordinate_descent_min_row_sum']:>11.3f}"
        )
    for name, micros in report["microseconds"].items():
        print(f"{name:<30} {micros:8.1f} us per call (epsilon 0.03)")
    print(
        f"cost exact / coordinate descent (20 steps): {report['cost_ratio_exact_over_cd']:.2f} forward, "
        f"{report['cost_ratio_exact_over_cd_with_backward']:.2f} forward+backward"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [add_bench_parser, add_bench_soft_topk_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coda", description="Conditional Adapters (CoDA) for Hugging Face models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(subparsers)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for our own output: no per-tensor loading bars or load reports."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        args.run(args)
    except (CommandError, ValueError) as error:
        print(f"coda {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
