"""``coda export``: a trained CoDA classifier as an ONNX graph that routes by itself, checked against PyTorch.

The graph keeps the routing: every routed layer scores its tokens, takes the top ``k = ceil(n_valid / r)`` per
example with a TopK whose ``k`` is computed from the attention mask, gathers them, runs the frozen layer on
them and scatters the update back. One file therefore serves any batch size, any sequence length and padded
batches whose rows differ in length.

It is traced with PyTorch's TorchScript exporter (``dynamo=False``). The ``torch.export`` exporter (the
default since torch 2.9) stops at the library's Python-side decisions on tensor values (``if (n_valid ==
0).any()`` and the ``dense``/``uniform`` flags in ``token_budget``, the router's finiteness check,
``int(k.max())``), which it cannot trace without changes to the library. The tracer instead evaluates
them once, on the example batch: the checks just drop out of the graph (it does not reject a row without
tokens, which :class:`~coda_adapters.app.onnx_classifier.OnnxClassifier` never builds), and while it runs
:func:`traceable_routing` swaps in export-friendly equivalents for the rest. Every export is then checked
against the unchanged PyTorch model with ONNX Runtime, on batches of other sizes and lengths than the
traced one; a difference in probabilities above :data:`TOLERANCE` is an error and nothing is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import check_int
from ..files import write_json
from ..version import __version__
from .classify import TASK_NAME, Encoded, length_sorted_batches, load_classifier, predict_probabilities
from .onnx_classifier import (
    INPUT_NAMES,
    INT8_NAME,
    ONNX_NAME,
    OUTPUT_NAME,
    OnnxClassifier,
    inference_session,
    onnx_step,
)
from .onnx_tracing import traceable_routing

REPORT_NAME = "coda_export.json"
# The layout of the graphs this exporter writes, recorded in coda_export.json: raised when a change makes
# older exports compute differently or run slower (2: row-wise ScatterND updates and eager attention; 3: the
# updates go to distinct rows, empty slots included; 4: router scores as a one-column MatMul, adapters in int8),
# so that a cache of exports (coda loadtest's) is made again
GRAPH_FORMAT = 4
DEFAULT_OPSET = 17
# ScatterND(reduction="add") needs 16; the TorchScript exporter goes up to 20
OPSET_RANGE = (16, 20)
TOLERANCE = 1e-3  # max absolute difference in class probabilities between ONNX Runtime and PyTorch

# The built-in check: sentences of different lengths, and one longer than any max_length (it is truncated)
CHECK_SENTENCES = (
    "Shares rose sharply after the company reported record quarterly profits.",
    "Rain.",
    "The match ended in a draw, leaving both teams level on points at the top of the table with two games left.",
    "Parliament votes next week on a budget that raises spending on schools and hospitals and cuts some taxes.",
    "A phone with a folding screen goes on sale on Friday.",
)
LONG_TEXT = " ".join(CHECK_SENTENCES * 12)
CHECK_TEXTS = (*CHECK_SENTENCES, LONG_TEXT)
# The traced batch: two rows of different lengths, none of the check's shapes
TRACE_TEXTS = ("an example sentence to trace the graph with", "a shorter one")


class ExportCheckError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model (nothing was written)."""


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


class LogitsOnly(nn.Module):
    """The classifier as the graph sees it: ``(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """The wrapped Hugging Face model computes attention with plain MatMul and Softmax while the tracer runs.

    Torch's ``scaled_dot_product_attention`` exports with a guard against fully masked rows (IsNaN and Where
    over every ``[batch, heads, n, n]`` score tensor) that ONNX Runtime spends about 14% of a MiniLM forward on at
    512 tokens; "eager" attention computes the same probabilities without it (the export's check compares the
    graph with the unchanged model, which keeps its own attention).
    """
    base = model.model  # CodaModel's Hugging Face model
    previous = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def trace_to_onnx(model: nn.Module, path: str | Path, example: dict[str, torch.Tensor], opset: int) -> None:
    """Write ``model`` (a CoDA sequence classifier in eval mode) to ``path`` with dynamic batch and sequence axes.

    The tracer's warnings are silenced: they flag the Python-side checks it evaluates once (analysed in
    :func:`traceable_routing`), and the export's check against PyTorch is what decides.
    """
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    with traceable_routing(), eager_attention(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LogitsOnly(model).eval(),
            (example["input_ids"], example["attention_mask"]),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def export_onnx(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int | None = None,
    quantize_int8: bool = False,
    check_texts: list[str] | None = None,
) -> dict[str, Any]:
    """Export the ``coda train`` classifier in ``adapter_dir`` to a deployable directory ``out_dir``.

    ``out_dir`` receives ``model.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64 ``[batch, sequence]``;
    output ``logits`` ``[batch, labels]``), the tokenizer, ``coda_task.json``, ``coda_export.json`` (this
    report) and, with ``quantize_int8``, ``model.int8.onnx`` (ONNX Runtime's dynamic int8 quantisation).

    The export is checked with ONNX Runtime against the PyTorch model on ``check_texts`` (default: built-in
    sentences of different lengths), as one padded batch and in batches of two: a probability difference
    above :data:`TOLERANCE` raises :class:`ExportCheckError` and ``out_dir`` is left as it was. The int8
    model's difference and argmax agreement are reported, not enforced. A missing or corrupt adapter
    directory raises ``ValueError``.
    """
    start = time.perf_counter()
    opset = check_opset(opset)
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    texts = list(CHECK_TEXTS if check_texts is None else check_texts)
    if not texts:
        raise ValueError("check_texts must hold at least one text")
    if out_dir.resolve() == adapter_dir.resolve():
        raise ValueError(f"the output directory must differ from the adapter directory ({adapter_dir})")
    model, tokenizer, task = load_exportable(adapter_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".coda-export-") as staging_name:
        staging = Path(staging_name)
        report = export_into(staging, model, tokenizer, task, adapter_dir, opset)
        report["check"] = check_export(model, tokenizer, task["max_length"], OnnxClassifier(staging), texts)
        if quantize_int8:
            quantized = quantize_int8_model(staging / ONNX_NAME, staging / INT8_NAME)
            comparison = compare_int8(model, tokenizer, task["max_length"], OnnxClassifier(staging, int8=True), texts)
            report["int8"] = {"onnx": INT8_NAME, "quantized_matmuls": quantized, **comparison}
        report["export_seconds"] = time.perf_counter() - start
        write_json(staging / REPORT_NAME, report)
        install(staging, out_dir, remove=() if quantize_int8 else (INT8_NAME,))
    return report


def export_into(
    staging: Path, model: nn.Module, tokenizer: Any, task: dict[str, Any], adapter_dir: Path, opset: int
) -> dict[str, Any]:
    """Write the unchecked deployable files into ``staging``; returns the start of the report."""
    trace_to_onnx(model, staging / ONNX_NAME, example_batch(tokenizer, task["max_length"]), opset)
    tokenizer.save_pretrained(staging)
    shutil.copy2(adapter_dir / TASK_NAME, staging / TASK_NAME)
    return {
        "source": str(adapter_dir),
        "onnx": ONNX_NAME,
        "opset": opset,
        "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False)",
        "graph_format": GRAPH_FORMAT,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "label_names": list(task["label_names"]),
        "max_length": task["max_length"],
        "coda_config": model.coda_config.to_dict(),
        "versions": export_versions(),
        "check": None,
        "int8": None,
    }


def check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    low, high = OPSET_RANGE
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f"opset must be an int from {low} to {high}, got {opset!r}")
    return opset


def load_exportable(adapter_dir: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The classifier of ``adapter_dir`` (``load_classifier``), or a ``ValueError`` saying what is wrong with it."""
    if not adapter_dir.is_dir():
        raise ValueError(f"{adapter_dir}: no such directory (expected a `coda train` output directory)")
    try:
        model, tokenizer, task = load_classifier(adapter_dir)
    except OSError as error:  # transformers' errors for unreadable model or tokenizer files
        raise ValueError(f"{adapter_dir}: cannot load the classifier ({error})") from None
    if model.coda_config.router == "random":
        raise ValueError(f"{adapter_dir}: a random router picks different tokens on every call; it has no fixed graph")
    return model, tokenizer, task


def example_batch(tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """The traced batch: two rows of different lengths, padded. Nothing of its shape or values stays in the
    graph (the check runs other shapes); padding just keeps the trace on the general path."""
    encoded = Encoded(tokenizer, list(TRACE_TEXTS), None, max_length)
    return encoded.batch(list(range(len(encoded))))


def install(staging: Path, out_dir: Path, remove: tuple[str, ...]) -> None:
    """Move the checked files into ``out_dir``, the model last, and drop ``remove`` left by an earlier export
    (an int8 model that no longer matches)."""
    for name in remove:
        (out_dir / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda p: (p.suffix == ".onnx", p.name)):
        os.replace(path, out_dir / path.name)


def export_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "coda_adapters": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


# --------------------------------------------------------------------------------------------------
# Checks against PyTorch
# --------------------------------------------------------------------------------------------------


def check_batch_sizes(count: int) -> list[int]:
    """One padded batch of everything, and batches of two (other shapes, rows of other lengths)."""
    return sorted({count, min(2, count)}, reverse=True)


def torch_probabilities(model: nn.Module, encoded: Encoded, batch_size: int) -> torch.Tensor:
    """The PyTorch model's probabilities, batched as ``coda eval`` batches them."""
    return predict_probabilities(model, encoded, batch_size)[0].float()


def compare_probabilities(
    model: nn.Module, tokenizer: Any, max_length: int, classifier: OnnxClassifier, texts: list[str]
) -> tuple[float, float, list[list[int]]]:
    """``(max |p_onnx - p_torch|, argmax agreement, batch shapes)`` over :func:`check_batch_sizes`."""
    encoded = Encoded(tokenizer, texts, None, max_length)
    if classifier.encode(texts).ids != encoded.ids:
        raise ExportCheckError(f"the tokenizer saved in {classifier.directory} encodes the check texts differently")
    worst, agree, shapes = 0.0, 1.0, []
    for batch_size in check_batch_sizes(len(texts)):
        reference = torch_probabilities(model, encoded, batch_size)
        exported = classifier.predict_encoded(encoded, batch_size)
        worst = max(worst, float((reference - exported).abs().max()))
        agree = min(agree, float((reference.argmax(-1) == exported.argmax(-1)).float().mean()))
        shapes += [
            [len(batch), max(len(encoded.ids[i]) for i in batch)]
            for batch in length_sorted_batches(encoded, batch_size)
        ]
    return worst, agree, shapes


def check_export(
    model: nn.Module,
    tokenizer: Any,
    max_length: int,
    classifier: OnnxClassifier,
    texts: list[str],
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Compare the exported model with PyTorch; :class:`ExportCheckError` above ``tolerance``."""
    worst, agreement, shapes = compare_probabilities(model, tokenizer, max_length, classifier, texts)
    if not worst <= tolerance:  # NaN fails too
        raise ExportCheckError(
            f"the exported model differs from PyTorch: max |probability difference| {worst:.3g} > {tolerance:g} "
            f"on {len(texts)} texts (batch shapes {shapes}); nothing was written. This architecture or setting "
            "may not trace correctly: please report it with the adapter's coda_config.json"
        )
    return {
        "texts": len(texts),
        "batch_shapes": shapes,
        "max_probability_difference": worst,
        "argmax_agreement": agreement,
        "tolerance": tolerance,
    }


def compare_int8(
    model: nn.Module, tokenizer: Any, max_length: int, classifier: OnnxClassifier, texts: list[str]
) -> dict[str, Any]:
    """The int8 model against PyTorch (informational: quantisation changes the numbers by design)."""
    worst, agreement, _ = compare_probabilities(model, tokenizer, max_length, classifier, texts)
    return {"texts": len(texts), "max_probability_difference": worst, "argmax_agreement": agreement}


# node-name scopes of the modules whose matrices int8 leaves in float32 (see quantize_int8_model)
FLOAT_SCOPES = ("/router/", "/lora_")


def quantizable_matmuls(path: Path) -> list[str]:
    """The MatMul nodes with a weight (an initialiser) outside the routers and LoRA: the frozen layers' and
    the adapters' linear layers. The head is a Gemm and the embeddings Gathers, so neither is among them."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in weights and not any(s in node.name for s in FLOAT_SCOPES)
    ]


def quantize_int8_model(source: Path, target: Path) -> int:
    """ONNX Runtime's dynamic quantisation of the frozen layers' and the adapters' linear layers; returns how
    many MatMuls it quantised.

    Weights are int8 per output channel and activations are quantised per call. Routers, LoRA, the
    embeddings and the head stay float32: a router's scores decide which tokens run, so int8 noise there
    changes discrete choices, and ORT cannot run a per-channel MatMul on the router's single weight column;
    LoRA in int8 was not measured. On a MiniLM classifier with a random adapter (40 texts), ORT's default
    (every weight, per tensor) was off by up to 0.32 in probability with 85% argmax agreement; the frozen
    layers alone by 0.13 with 97.5%; adding the word embeddings made it 0.41 and 92.5%. The adapters run on
    every token, so at r = 3 they were a tenth of the int8 graph's time (MiniLM, 8 x 512 tokens); in int8
    the graph ran 1.07x faster, with the same test accuracy on bbc-needle (r = 3, 99.65%) and BBC News
    (r = 5 97.42%, dense 98.12%) as with float adapters. (PyTorch's ``coda eval --quantize int8`` converts
    the frozen layers only.)
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = quantizable_matmuls(source)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process the model, which changed nothing here
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
        )
    finally:
        logging.disable(previous)
    return len(nodes)


def format_export_report(report: dict[str, Any], out_dir: str | Path) -> str:
    """A few lines for the terminal."""
    check = report["check"]
    lines = [
        f"wrote {Path(out_dir) / report['onnx']} (opset {report['opset']}) in {report['export_seconds']:.1f} s",
        f"check against PyTorch on {check['texts']} texts: max probability difference "
        f"{check['max_probability_difference']:.2e} (tolerance {check['tolerance']:g}), "
        f"argmax agreement {check['argmax_agreement']:.0%}",
    ]
    if report["int8"] is not None:
        int8 = report["int8"]
        lines.append(
            f"int8: {Path(out_dir) / int8['onnx']}: max probability difference "
            f"{int8['max_probability_difference']:.2e}, argmax agreement {int8['argmax_agreement']:.0%} (informational)"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Speed: PyTorch against ONNX Runtime, side by side
# --------------------------------------------------------------------------------------------------


def timing_batch(tokenizer: Any, seq_len: int, batch_size: int) -> dict[str, torch.Tensor]:
    """``batch_size`` rows of exactly ``seq_len`` tokens (no padding), from the built-in sentences."""
    encoded = tokenizer(
        [LONG_TEXT] * batch_size, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if ids.shape[1] != seq_len or not bool(mask.all()):
        raise ValueError(f"could not build a batch of {seq_len} tokens per row (got {tuple(ids.shape)})")
    return {"input_ids": ids, "attention_mask": mask}


def compare_speed(
    adapter_dir: str | Path,
    export_dir: str | Path | None = None,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
) -> dict[str, Any]:
    """Latency of the PyTorch model against its ONNX export (and the int8 one, if there), in one process.

    ``export_dir`` is a ``coda export`` output of ``adapter_dir``; None exports to a temporary directory
    (with int8). Each round runs every variant once, in a rotating order
    (:func:`coda_adapters.app.bench.time_interleaved`); the medians are reported, with
    ``speedup_vs_pytorch`` = PyTorch's median / the variant's. ``threads`` (default: torch's current
    setting) applies to PyTorch and ONNX Runtime alike.
    """
    if export_dir is None:
        with tempfile.TemporaryDirectory(prefix="coda-export-") as temporary:
            export_onnx(adapter_dir, temporary, quantize_int8=True)
            return compare_speed(
                adapter_dir,
                temporary,
                seq_len=seq_len,
                batch_size=batch_size,
                repeats=repeats,
                warmup=warmup,
                threads=threads,
            )
    from .bench import inference_step, time_interleaved

    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("repeats", repeats)):
        check_int(name, value, low=1)
    model, tokenizer, _ = load_exportable(Path(adapter_dir))
    positions = getattr(model.config, "max_position_embeddings", seq_len)
    if seq_len > positions:
        raise ValueError(f"seq_len {seq_len} is more than the model's {positions} positions")
    batch = timing_batch(tokenizer, seq_len, batch_size)
    threads = threads or torch.get_num_threads()
    steps = {"pytorch": inference_step(model, batch)}
    for name, file in (("onnxruntime", ONNX_NAME), ("onnxruntime int8", INT8_NAME)):
        if (Path(export_dir) / file).is_file():
            steps[name] = onnx_step(inference_session(Path(export_dir) / file, threads, spinning=False), batch)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = time_interleaved(steps, repeats, warmup)
    finally:
        torch.set_num_threads(previous)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "threads": threads,
        "repeats": repeats,
        "latency_ms": {name: 1e3 * median for name, median in medians.items()},
        "speedup_vs_pytorch": {name: medians["pytorch"] / medians[name] for name in medians if name != "pytorch"},
    }


def format_speed_report(report: dict[str, Any]) -> str:
    lines = [
        f"batch {report['batch_size']} x {report['seq_len']} tokens, {report['threads']} threads, "
        f"median of {report['repeats']} rounds"
    ]
    for name, latency in report["latency_ms"].items():
        ratio = report["speedup_vs_pytorch"].get(name)
        lines.append(f"{name:<18} {latency:9.1f} ms" + ("" if ratio is None else f"   x{ratio:.2f} vs PyTorch"))
    return "\n".join(lines)
