"""The ``coda`` command line (also ``python -m coda_adapters``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .commands import (
    add_bench_mixed_parser,
    add_bench_parser,
    add_bench_soft_topk_parser,
    add_experiment_parser,
    add_prefill_parser,
    add_vision_parser,
)
from .loadtest import add_loadtest_parser
from .options import (
    CommandError,
    add_dataclass_options,
    add_subcommand,
    dataclass_from_args,
    output_directory,
    output_file,
)
from .serve import add_serve_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The CLI's deliberate differences from the library's defaults, in one place:
# - pooling="mean" (library: "cls"): `coda train` makes classifiers, and a classifier that reads only
#   [CLS] wastes the last layer's routing (its router gets no gradient): in a pilot at r = 5, "cls"
#   reached 88% validation accuracy on BBC News where "mean" reached 97% (README, "Pooling").
CLI_CODA_DEFAULTS = {"pooling": "mean"}


# --------------------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The base model and every CoDA setting (``CodaConfig``'s fields, with the CLI's defaults)."""
    from ..config import CodaConfig

    group = parser.add_argument_group("model (CodaConfig)")
    group.add_argument("--model", default="minilm", help="bundled model name (minilm, mpnet) or local model directory")
    add_dataclass_options(group, CodaConfig, defaults=CLI_CODA_DEFAULTS)


def coda_config_from(args: argparse.Namespace) -> Any:
    from ..config import CodaConfig

    return dataclass_from_args(CodaConfig, args)


def add_data_arguments(parser: argparse.ArgumentParser, *, default: str | None = "bbc-news") -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=default,
        required=default is None,
        help="bbc-news or bbc-needle (built in; see the README) or a CSV/TSV/JSONL file with text and label columns",
    )
    group.add_argument("--text-column", default="text", help="the column holding the texts")
    group.add_argument("--label-column", default="label", help="the column holding the labels")
    group.add_argument("--test", help="a separate test file (otherwise --test-size of --data is held out)")
    group.add_argument("--test-size", type=float, default=0.2, help="share of --data held out for testing")


def load_data_from(args: argparse.Namespace, model: str, max_length: int):
    """The data of ``--data``; ``bbc-needle`` is built for ``model``'s tokenizer and ``max_length``."""
    from .assets import load_tokenizer
    from .data import load_classification_data

    return load_classification_data(
        args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        test=args.test,
        test_size=args.test_size,
        seed=getattr(args, "seed", 0),
        tokenizer=load_tokenizer(model) if args.data == "bbc-needle" else None,
        max_length=max_length,
    )


def add_text_input_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """A trained classifier and the texts it runs on (what :func:`read_texts` reads)."""
    parser.add_argument("--adapter", required=True, help="a `coda train` output directory")
    parser.add_argument("texts", nargs="*", help=f"texts to {verb}")
    parser.add_argument("--file", help="texts from a file: one per line (.txt) or a CSV/TSV/JSONL column")
    parser.add_argument("--text-column", default="text", help="the column holding the texts (CSV/TSV/JSONL)")


def read_texts(args: argparse.Namespace) -> list[str]:
    """Texts from the command line or ``--file`` (one per line, or a CSV/TSV/JSONL column)."""
    from .data import load_corpus

    texts = list(args.texts)
    if args.file:
        texts += load_corpus(args.file, text_column=args.text_column)
    if not texts:
        raise CommandError("give one or more texts, or --file")
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise CommandError(f"text {empty[0] + 1} is empty; there is nothing to classify")
    return texts


# --------------------------------------------------------------------------------------------------
# pretrain / train / eval / export / predict / explain (serve: serve.py; the rest: commands.py)
# --------------------------------------------------------------------------------------------------


def add_pretrain_parser(subparsers: argparse._SubParsersAction) -> None:
    from .pretrain import PretrainConfig

    parser = add_subcommand(subparsers, "pretrain", help="CoDA pretraining of routers and adapters on unlabelled text")
    add_model_arguments(parser)
    group = parser.add_argument_group("pretraining (PretrainConfig)")
    group.add_argument("--out", required=True, help="directory for the pretrained routers and adapters")
    group.add_argument(
        "--corpus",
        default="bbc-news",
        help="bbc-news (its training split), a .txt file (one document per line) or a CSV/JSONL file",
    )
    group.add_argument("--text-column", default="text", help="the column holding the texts (CSV/TSV/JSONL)")
    add_dataclass_options(group, PretrainConfig)
    parser.set_defaults(run=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> None:
    from .data import load_corpus
    from .pretrain import PretrainConfig, build_pretraining_model, pretrain

    config = dataclass_from_args(PretrainConfig, args)
    output_directory(args.out)
    texts = load_corpus(args.corpus, text_column=args.text_column)
    torch_seed(args.seed)
    model, tokenizer = build_pretraining_model(args.model, coda_config_from(args), args.objective)
    metrics = pretrain(model, tokenizer, texts, config, args.out, model_name=args.model)
    print(
        f"pretrained on {len(texts)} documents: loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f} "
        f"in {metrics['pretrain_seconds']:.0f} s; saved to {args.out}"
    )
    # at the default router rate, pretrained routers barely move in fine-tuning (README, "Why pretrained routers...")
    print(f"fine-tune with: coda train --init {args.out} --router-lr-scale 30 (and the same --reduction)")


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from .classify import TrainConfig

    parser = add_subcommand(subparsers, "train", help="fine-tune routers, adapters and a classification head")
    add_model_arguments(parser)
    add_data_arguments(parser)
    group = parser.add_argument_group("training (TrainConfig)")
    group.add_argument("--out", required=True, help="directory for the adapter, checkpoints and metrics.json")
    group.add_argument(
        "--init",
        help="start from a `coda pretrain` output (its routers barely move at the default --router-lr-scale 1; "
        "10 or 30 let the task move them: README, 'Why pretrained routers cost r = 3')",
    )
    group.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    group.add_argument(
        "--max-train-examples", type=int, help="use only this many training examples, for quick runs (None: all)"
    )
    group.add_argument("--dropout", type=float, help="the base model's dropout during training (None: its own)")
    add_dataclass_options(group, TrainConfig)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    from .classify import (
        TrainConfig,
        build_classifier,
        check_router_start,
        load_backbone_adapter,
        pretrained_start_notes,
        train_classifier,
    )
    from .data import subsample

    config = dataclass_from_args(TrainConfig, args)
    check_router_start(args.init, config.router_init)
    output_directory(args.out)
    data = load_data_from(args, args.model, config.max_length)
    if args.max_train_examples is not None:
        data.train = subsample(data.train, args.max_train_examples, args.seed)
    torch_seed(args.seed)
    coda_config = coda_config_from(args)
    model, tokenizer = build_classifier(args.model, coda_config, data.label_names, dropout=args.dropout)
    extra, notes = {}, []
    if args.init:
        pretrained = load_backbone_adapter(model, args.init)
        extra["init"] = {"directory": args.init, "coda_config": pretrained.to_dict()}
        notes = pretrained_start_notes(pretrained, coda_config, config.router_lr_scale)
    if int(os.environ.get("RANK", "0")) == 0:  # once under `accelerate launch`
        model.print_trainable_parameters()
        for note in notes:
            print(f"note: {note}")
    metrics = train_classifier(
        model, tokenizer, data, config, args.out, model_name=args.model, resume=args.resume, extra_metrics=extra
    )
    if metrics:
        print(
            f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
            f"{metrics['eval_examples_per_second']:.1f} examples/s; training {metrics['train_seconds']:.0f} s; "
            f"saved to {args.out}"
        )


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers, "eval", help="accuracy, macro-F1, confusion matrix and speed of a trained adapter"
    )
    parser.add_argument("--adapter", required=True, help="a `coda train` output directory")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "bf16"],
        help="int8: dynamic quantisation of the frozen layers' linear layers; bf16: every weight in bfloat16 "
        "(PyTorch only)",
    )
    parser.add_argument(
        "--runtime",
        default="pytorch",
        choices=["pytorch", "onnxruntime"],
        help="onnxruntime: --adapter is a `coda export` directory (with --quantize int8: its model.int8.onnx)",
    )
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from ..files import write_json
    from .classify import evaluate, format_confusion_matrix, load_classifier, read_task
    from .data import BUILTIN_DATASETS, LabelledTexts, encode_labels, read_labelled_file

    if args.json:
        output_file(args.json, "--json")
    if args.runtime == "onnxruntime":
        from .onnx_classifier import OnnxClassifier, evaluate_onnx

        if args.quantize == "bf16":
            raise CommandError("--quantize bf16 runs on --runtime pytorch only (an export is float32 or int8)")
        classifier = OnnxClassifier(args.adapter, int8=args.quantize == "int8")
        names = classifier.label_names
    else:
        from .bench import lower_precision

        model, tokenizer, task = load_classifier(args.adapter)
        lower_precision(model, args.quantize)
        names = task["label_names"]
    if args.data in BUILTIN_DATASETS:
        task = read_task(args.adapter)  # a built-in dataset is evaluated as the adapter was trained: its test split
        data = load_data_from(args, task["model"], task["max_length"])
        if data.label_names != names:
            raise CommandError(f"the adapter's labels {names} differ from {args.data}'s {data.label_names}")
        test = data.test
    else:  # a user file is evaluated whole
        texts, raw, lines = read_labelled_file(args.data, args.text_column, args.label_column)
        test = LabelledTexts(texts, encode_labels(args.data, raw, lines, names))
    if args.runtime == "onnxruntime":
        metrics = evaluate_onnx(classifier, test, args.batch_size)
    else:
        metrics = evaluate(model, tokenizer, test, names, task["max_length"], args.batch_size)
    print(
        f"{len(test.texts)} examples: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"{metrics['eval_examples_per_second']:.1f} examples/s"
    )
    print(format_confusion_matrix(names, metrics["confusion_matrix"]))
    if args.json:
        write_json(args.json, metrics)


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers,
        "export",
        help="a trained classifier as an ONNX graph that routes by itself, checked against PyTorch",
    )
    parser.add_argument("--adapter", required=True, help="a `coda train` output directory")
    parser.add_argument("--out", required=True, help="directory for model.onnx, the tokenizer and coda_task.json")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (onnxruntime dynamic int8)")
    parser.add_argument("--opset", type=int, help="ONNX opset, 16 to 20 (None: 17)")
    parser.add_argument(
        "--bench", action="store_true", help="then time PyTorch against ONNX Runtime side by side (256 tokens)"
    )
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from .export import ExportCheckError, compare_speed, export_onnx, format_export_report, format_speed_report

    output_directory(args.out)
    try:
        report = export_onnx(args.adapter, args.out, opset=args.opset, quantize_int8=args.int8)
    except ExportCheckError as error:
        raise CommandError(str(error)) from None
    print(format_export_report(report, args.out))
    if args.bench:
        print(format_speed_report(compare_speed(args.adapter, args.out)))


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "predict", help="labels with probabilities for new texts")
    add_text_input_arguments(parser, "classify")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    group = parser.add_argument_group("batch prediction (with --file and --out)")
    group.add_argument(
        "--out", help="stream --file's predictions to this JSONL file (constant memory; resumes after a crash)"
    )
    group.add_argument("--chunk-size", type=int, default=1024, help="rows read, length-sorted and written together")
    group.add_argument("--restart", action="store_true", help="start --out over instead of resuming it")
    parser.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> None:
    from .classify import Encoded, load_classifier, predict_probabilities

    if args.out:
        predict_to_file(args)
        return
    texts = read_texts(args)
    model, tokenizer, task = load_classifier(args.adapter)
    names = task["label_names"]
    truncated = sum(len(ids) >= task["max_length"] for ids in tokenizer(texts, truncation=False)["input_ids"])
    if truncated:
        print(f"note: {truncated} text(s) longer than {task['max_length']} tokens were truncated", file=sys.stderr)
    probabilities, _ = predict_probabilities(
        model, Encoded(tokenizer, texts, None, task["max_length"]), args.batch_size
    )
    for text, row in zip(texts, probabilities, strict=True):
        ranked = sorted(zip(names, row.tolist(), strict=True), key=lambda pair: -pair[1])
        if args.json:
            print(json.dumps({"text": text, "label": ranked[0][0], "probabilities": dict(ranked)}))
        else:
            shown = ", ".join(f"{name} {p:.3f}" for name, p in ranked[:3])
            print(f"{ranked[0][0]}\t({shown})\t{text[:80]}")


def predict_to_file(args: argparse.Namespace) -> None:
    """``coda predict --file IN --out OUT``: streamed, resumable, sharded under ``accelerate launch``."""
    from .batch_predict import predict_file

    if not args.file or args.texts:
        raise CommandError("--out writes the predictions of --file; give --file and no texts on the command line")
    output_file(args.out, "--out")
    summary = predict_file(
        args.adapter,
        args.file,
        args.out,
        text_column=args.text_column,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        overwrite=args.restart,
    )
    print(
        f"{summary['rows_written']} rows predicted, {summary['rows_skipped']} done before; "
        f"{summary['truncated']} texts truncated; {summary['rows_per_second']:.1f} rows/s -> {summary['output']}",
        file=sys.stderr,
    )


def add_explain_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(subparsers, "explain", help="which tokens each layer's router kept, as text, HTML or PNG")
    add_text_input_arguments(parser, "explain")
    parser.add_argument("--out", help="also write an .html page or a .png heat-map")
    parser.set_defaults(run=run_explain)


def run_explain(args: argparse.Namespace) -> None:
    from .classify import load_classifier
    from .explain import as_text, explain_texts, write_html, write_png

    if args.out and not args.out.lower().endswith((".html", ".png")):
        raise CommandError(f"--out must end in .html or .png, got {args.out!r}")
    if args.out:
        output_file(args.out, "--out")
    texts = read_texts(args)
    model, tokenizer, task = load_classifier(args.adapter)
    explanations = explain_texts(model, tokenizer, texts, task["label_names"], task["max_length"])
    for explanation in explanations:
        print(as_text(explanation))
    if args.out:
        (write_html if args.out.lower().endswith(".html") else write_png)(explanations, args.out)
        print(f"wrote {args.out}")


PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_pretrain_parser,
    add_train_parser,
    add_eval_parser,
    add_export_parser,
    add_predict_parser,
    add_serve_parser,
    add_loadtest_parser,
    add_explain_parser,
    add_experiment_parser,
    add_bench_parser,
    add_bench_mixed_parser,
    add_bench_soft_topk_parser,
    add_prefill_parser,
    add_vision_parser,
]


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
    from .loop import TrainingError

    try:
        args.run(args)
    except (CommandError, ValueError, TrainingError) as error:
        print(f"coda {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that cannot be read or written: name it, no traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"coda {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
