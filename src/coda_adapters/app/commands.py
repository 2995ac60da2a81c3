"""The ``coda`` subcommands that measure and demonstrate: ``experiment``, ``bench``, ``bench-mixed-adapters``,
``bench-soft-topk``, ``prefill`` and ``vision``. Each module they run is imported when the command runs, not
when ``coda`` builds its parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ROUTER_KINDS, check_int
from .options import (
    CommandError,
    add_dataclass_options,
    add_subcommand,
    dataclass_from_args,
    flag,
    output_directory,
    output_file,
)
from .vision_data import PLACEMENTS


def add_experiment_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers,
        "experiment",
        help="train every baseline and CoDA variant with one recipe and time them side by side (the README table)",
    )
    parser.add_argument(
        "--preset",
        default="results",
        choices=[
            "routing",
            "routing-long",
            "needle",
            "needle-ablation",
            "needle-router-init",
            "needle-router-init-text",
            "needle-epsilon",
            "needle-epsilon-anneal",
            "needle-epsilon-anneal-gentle",
            "bbc-router-init",
            "bbc-router-init-text",
            "bbc-epsilon-anneal",
            "needle-straight-through",
            "bbc-straight-through",
            "needle-z-loss",
            "needle-pretrain",
            "needle-pretrain-router-lr",
            "bbc-pretrain-router-lr",
            "bbc-r5-lead39",
            "prior",
            "prior-r5",
            "prior-r5-anneal",
            "prior-r5-lead39",
            "prior-r5-lead52",
            "prior-r5-lead39-long",
            "prior-needle",
            "prior-needle-lead33",
            "aggressive",
            "needle-aggressive",
            "demo",
            "mpnet",
            "results",
            "smoke",
        ],
        help="which rows, data and recipe: BBC News at r = 3 to 16 against truncation and random routers; r = 3 "
        "and 5 there with 5 epochs; the same on bbc-needle; which part of the routing recipe matters there; routers "
        "fitted to the frozen model's attention there, or to its text tokens' attention (r = 5); a softer soft top-k "
        "there, fixed or annealed (from 1 or 0.3); fitted routers (all tokens or text tokens) or an annealed soft "
        "top-k on BBC News at r = 5; straight-through routers on bbc-needle (r = 3, 5) and BBC News (r = 5); half "
        "of r = 3's (or r = 5's) budget kept for the first tokens, on BBC News and bbc-needle (at r = 5 also with "
        "the annealed soft top-k, and three quarters or all of the budget; three quarters with 5 epochs); r = 8 "
        "and 16 without warm-up; r = 8 and 16 on bbc-needle (plain and fitted routers); CoDA pretraining of the "
        "routers on bbc-needle (r = 3, 5, 16), also with routers at 10x (and 30x) the learning rate, and "
        "pretrained routers at 30x on BBC News (r = 5), and that table's other rows alone (for more seeds); the "
        "short demo; the MPNet point; the adapter-kinds table; a smoke test",
    )
    parser.add_argument("--model", default="minilm", help="bundled model name or local model directory")
    parser.add_argument("--out", required=True, help="directory for every row's outputs and the results table")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="retrain every row (of --rows) for --seeds; runs of other seeds stay (default: keep finished runs)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="SEED",
        help="train every row once per seed; the table gives mean ± std and paired differences against the "
        "dense adapter and the truncated input (seed 0 alone keeps the layout OUT/<row>/, and counts as seed 0 "
        "of a later run of several); no table is written while OUT holds every row's runs of other seeds too",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="ROW",
        help="train only these rows (their directory names under OUT, e.g. coda-r-3), to split a preset over "
        "processes or machines sharing OUT; the table is written by the run that finds every row finished "
        "(default: every row)",
    )
    parser.set_defaults(run=run_experiment_command)


def run_experiment_command(args: argparse.Namespace) -> None:
    from .assets import load_tokenizer
    from .data import builtin_dataset
    from .experiment import PRESETS, run_experiment

    output_directory(args.out)
    preset = PRESETS[args.preset]
    run_experiment(
        preset,
        builtin_dataset(preset.data, load_tokenizer(args.model), preset.train.max_length),
        args.out,
        model_name=args.model,
        fresh=args.fresh,
        seeds=tuple(args.seeds),
        only=None if args.rows is None else tuple(args.rows),
    )


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers,
        "bench",
        help="time CoDA against the dense parallel adapter, the frozen model and merged LoRA",
        description="Time forwards (or training steps with --train) side by side, settings interleaved. With "
        "--runtime onnxruntime, CoDA classifiers at each reduction are exported to ONNX and timed on ONNX Runtime "
        "beside their float PyTorch selves.",
    )
    parser.add_argument("--model", default="minilm", help="bundled model name or local model directory")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512], help="tokens per example")
    parser.add_argument(
        "--reductions",
        type=float,
        nargs="+",
        default=[1, 3, 5],
        help="CoDA reductions r (1, the dense adapter, is required)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per timed call")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch (and of ONNX Runtime)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each setting first")
    parser.add_argument(
        "--warm-calls",
        type=int,
        default=0,
        help="untimed calls of each setting right before each of its timed calls: warm caches, as in a process "
        "that runs one model (default 0: each timed call follows another setting's)",
    )
    parser.add_argument("--bottleneck", type=int, default=64, help="adapter width")
    parser.add_argument(
        "--runtime",
        default="pytorch",
        choices=["pytorch", "onnxruntime"],
        help="onnxruntime: export a CoDA classifier (random weights) at each reduction and time its ONNX graph "
        "beside the float PyTorch classifiers (inference only; speed-ups are also given against PyTorch's r = 1)",
    )
    parser.add_argument("--train", action="store_true", help="time forward + backward + AdamW step")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "bf16"],
        help="int8: dynamic quantisation of the frozen layers' linear layers (with --runtime onnxruntime: also "
        "time the int8 graphs of `coda export --int8`; PyTorch stays float); bf16: every weight in bfloat16 "
        "(PyTorch only); either way `vs float` is against the float32 dense adapter",
    )
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-length padded batches")
    parser.add_argument("--profile", action="store_true", help="print where the time goes (torch.profiler)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--plot", help="write a speed-up plot (PNG) to this file")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from .bench import format_table, plot_speedups, run_benchmark, write_bench_json

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            output_file(path, option)
    rows = run_benchmark(
        model_name=args.model,
        seq_lens=args.seq_lens,
        reductions=args.reductions,
        batch_size=args.batch_size,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        warm_calls=args.warm_calls,
        train=args.train,
        quantize=args.quantize,
        mixed=not args.no_mixed,
        bottleneck=args.bottleneck,
        profile=args.profile,
        runtime=args.runtime,
    )
    print(format_table(rows))
    if args.json:
        write_bench_json(rows, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(rows, args.plot)
        print(f"wrote {args.plot}")


def add_bench_mixed_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers,
        "bench-mixed-adapters",
        help="time one model call mixing adapters against one adapter's call and one call per adapter",
        description="Build adapters with random weights on one base, load them as `coda serve` does, and time "
        "the mixed (stacked) call, a single adapter's call and the calls grouped per adapter, interleaved.",
    )
    parser.add_argument("--model", default="minilm", help="bundled model name or local model directory")
    parser.add_argument("--adapters", type=int, default=8, help="adapters mixed in the batch")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per text (special tokens included)")
    parser.add_argument("--reduction", type=float, default=3.0, help="every adapter's r")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each step first")
    parser.add_argument("--json", help="write the report to this JSON file")
    parser.set_defaults(run=run_bench_mixed)


def run_bench_mixed(args: argparse.Namespace) -> None:
    from ..files import write_json
    from .bench_mixed import format_mixed_adapter_report, mixed_adapter_report

    for name in ("adapters", "batch_size", "seq_len", "threads", "repeats"):
        check_int(flag(name), getattr(args, name), low=1)
    if args.json:
        output_file(args.json, "--json")
    options = ("model", "adapters", "batch_size", "seq_len", "reduction", "threads", "repeats", "warmup")
    report = mixed_adapter_report(**{name: getattr(args, name) for name in options})
    print(format_mixed_adapter_report(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")


def add_bench_soft_topk_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers,
        "bench-soft-topk",
        help="soft top-k: error against a float64 reference and cost, exact vs the paper's solver",
    )
    parser.add_argument("--n", type=int, default=512, help="scores per row")
    parser.add_argument("--k", type=int, default=171, help="how many to select")
    parser.add_argument("--batch-size", type=int, default=8, help="rows")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", help="write the report to this JSON file")
    parser.set_defaults(run=run_bench_soft_topk)


def run_bench_soft_topk(args: argparse.Namespace) -> None:
    from ..files import write_json
    from .bench import format_soft_topk_report, soft_topk_report

    if not 1 <= args.k <= args.n:
        raise CommandError(f"--k must be in [1, --n={args.n}], got {args.k}")
    report = soft_topk_report(n=args.n, batch=args.batch_size, k=args.k, repeats=args.repeats, threads=args.threads)
    print(format_soft_topk_report(report))
    if args.json:
        write_json(args.json, report)


# --------------------------------------------------------------------------------------------------
# Demos beyond text classification
# --------------------------------------------------------------------------------------------------


def add_prefill_parser(subparsers: argparse._SubParsersAction) -> None:
    from .prefill_distill import PrefillRouting

    parser = add_subcommand(
        subparsers,
        "prefill",
        help="routed prompt processing on SmolLM2: speed-up and effect on the next-token distribution",
        description="Time routed prefills against the dense parallel adapter and compare what the model "
        "predicts next (KL divergence) on BBC News text; writes results.json and results.md.",
    )
    parser.add_argument("--model", default="smollm2", help="bundled decoder LM name or local model directory")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024], help="prompt lengths in tokens")
    parser.add_argument("--reductions", type=float, nargs="+", default=[3, 5], help="CoDA reductions r > 1")
    parser.add_argument("--prompts", type=int, default=8, help="prompts scored per length")
    parser.add_argument("--continuation", type=int, default=16, help="tokens scored after each prompt")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per timed forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="also score each routed prefill after this many steps of prefill pretraining (distillation)",
    )
    parser.add_argument(
        "--reduction-warmup",
        type=float,
        default=0.0,
        help="share of the pretraining steps over which the routed prefill goes from every token to r (0 = none)",
    )
    parser.add_argument(
        "--passkey",
        type=int,
        default=0,
        metavar="N",
        help="also run the pass-key probe on N prompts per length (with --pretrain-steps, pretraining reads "
        "other pass-key prompts)",
    )
    parser.add_argument(
        "--seeds",
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="the routers' initial weights and the pretraining data and its order; two or more run once per seed "
        "into OUT/seed-S (a seed finished there with the same settings is kept; only the first is timed) and write "
        "summary.md, mean ± std",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the speed measurement")
    parser.add_argument(
        "--no-quality", action="store_true", help="skip the next-token KL on BBC text (and its pretraining)"
    )
    parser.add_argument("--out", default="runs/prefill", help="output directory")
    recipe = parser.add_argument_group(
        "routing recipe",
        "which prompt tokens every routed layer keeps (--keep-first 0 --window-share 0 "
        "--no-share-selection: the paper's routing, one router per layer)",
    )
    add_dataclass_options(recipe, PrefillRouting)
    parser.set_defaults(run=run_prefill)


def run_prefill(args: argparse.Namespace) -> None:
    from .prefill import run_prefill_demo, run_prefill_seeds
    from .prefill_distill import PrefillRouting

    output_directory(args.out)
    routing = dataclass_from_args(PrefillRouting, args)
    options = dict(
        lengths=tuple(args.seq_lens),
        reductions=tuple(args.reductions),
        prompts=args.prompts,
        continuation=args.continuation,
        batch_size=args.batch_size,
        repeats=args.repeats,
        pretrain_steps=args.pretrain_steps,
        reduction_warmup=args.reduction_warmup,
        passkey=args.passkey,
        model_name=args.model,
        time_prefill=not args.no_timing,
        routing=routing,
        score_quality=not args.no_quality,
    )
    if len(args.seeds) > 1:
        run_prefill_seeds(args.out, args.seeds, **options)
        print(Path(args.out, "summary.md").read_text(encoding="utf-8"))
    else:
        run_prefill_demo(args.out, seed=args.seeds[0], **options)
        print(Path(args.out, "results.md").read_text(encoding="utf-8"))


def add_vision_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers,
        "vision",
        help="ViT demo: pretrain a small ViT on MNIST-5k here, then CoDA-adapt it to scikit-learn's digits",
        description="There is no pretrained ViT offline: a small ViT is pretrained densely on MNIST-5k "
        "(cached), frozen, and adapted to the 8x8 digits upscaled to 28x28 with the dense parallel adapter and "
        "CoDA; reports accuracy and the side-by-side inference speed-up.",
    )
    parser.add_argument("--out", default="runs/vision", help="output directory")
    parser.add_argument("--cache-dir", help="where the pretrained backbone is kept (default: the user cache)")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT and one epoch: a smoke test, not a result")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="adaptation seeds (head and router initialisation, batch order); two or more run the demo once per "
        "seed in OUT/seed-<s>/ on one backbone and write summary.md with mean and std",
    )
    parser.add_argument(
        "--dense-start",
        type=float,
        help="share of the adaptation steps with every token kept (as in coda train; default: the demo's)",
    )
    parser.add_argument(
        "--reduction-warmup",
        type=float,
        help="share of the adaptation steps lowering the kept share of tokens to 1/r (default: the demo's)",
    )
    parser.add_argument("--epochs", type=int, help="adaptation epochs of every variant (default: the demo's)")
    parser.add_argument(
        "--keep-last",
        action="store_true",
        help="end each variant with its last epoch's weights (default: those of its best validation epoch)",
    )
    parser.add_argument(
        "--epsilon", type=float, help="the routers' soft top-k entropy weight (CodaConfig.epsilon; default: the demo's)"
    )
    parser.add_argument(
        "--mnist-pretrain-epochs",
        type=int,
        help="CoDA pretraining: train each variant's adapters and routers this many epochs on the backbone's own "
        "task (MNIST-5k, its own head) before the digits; 0 for none (default: the demo's, 10; --quick: 0)",
    )
    parser.add_argument(
        "--router",
        choices=ROUTER_KINDS,
        help="the CoDA variants' routers: learned, or random (the compute-matched baseline; default: learned)",
    )
    parser.add_argument(
        "--router-init",
        choices=("random", "attention"),
        help="how learned routers start: random (default), or fitted to the attention each token receives in the "
        "frozen backbone (ridge regression on 256 training images; coda_adapters.router_init)",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="beside every CoDA reduction r, the compute-matched baselines: the dense adapter on the central "
        "ceil(n / r) tokens (the crop) and CoDA with random routers",
    )
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        help="where the digits sit: centred in the frame as MNIST's (default), or scaled to 12x12 at a random spot, "
        "where a central crop sees only part of most digits (the backbone is pretrained on MNIST placed the same "
        "way, moved each epoch, 40 epochs without PatchDropout, and cached apart)",
    )
    parser.set_defaults(run=run_vision)


def run_vision(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .vision import adapt_seed, demo_settings, run_vision_demo, run_vision_seeds, with_adaptation

    def given(options: dict) -> dict:  # the options set on the command line
        return {name: value for name, value in options.items() if value is not None}

    output_directory(args.out)
    settings = demo_settings(args.quick, args.placement or "centre")
    recipe = {"dense_start": args.dense_start, "reduction_warmup": args.reduction_warmup, "epochs": args.epochs}
    recipe["keep_best"] = False if args.keep_last else None
    settings = with_adaptation(settings, **given(recipe))
    chosen = {"epsilon": args.epsilon, "router": args.router, "mnist_pretrain_epochs": args.mnist_pretrain_epochs}
    chosen["router_init"] = args.router_init
    chosen["baselines"] = True if args.baselines else None
    settings = replace(settings, **given(chosen))
    if len(args.seeds) == 1:
        settings = adapt_seed(settings, args.seeds[0])
        run_vision_demo(args.out, cache_dir=args.cache_dir, quick=args.quick, settings=settings)
        print(Path(args.out, "results.md").read_text(encoding="utf-8"))
        return
    run_vision_seeds(args.out, args.seeds, cache_dir=args.cache_dir, quick=args.quick, settings=settings)
    print(Path(args.out, "summary.md").read_text(encoding="utf-8"))
