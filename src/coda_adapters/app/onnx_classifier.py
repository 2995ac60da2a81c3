"""Serve a classifier exported by ``coda export`` with ONNX Runtime: no PyTorch model, no base weights.

The export directory holds ``model.onnx`` (and ``model.int8.onnx`` with ``--int8``), the tokenizer and
``coda_task.json``. Texts are tokenised and batched exactly as ``coda eval`` does for the PyTorch model
(:class:`~coda_adapters.app.classify.Encoded`: truncated to ``max_length``, padded per batch, batches of
similar length), so both runtimes see the same inputs and their metrics are comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import check_int
from .classify import Encoded, classification_metrics, length_sorted_batches, read_task
from .data import LabelledTexts

ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"


def inference_session(path: str | Path, threads: int | None = None, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session for ``path``; ``threads`` sets its intra-op threads (None: ORT's default).

    ORT logs errors only (severity 3), so that a server's log keeps to its own lines. ``spinning=False``
    stops its threads from busy-waiting after a call (ORT's default keeps them spinning for the next one):
    benchmarks that interleave ORT with PyTorch need it, or the spinning threads slow the PyTorch call
    that follows and flatter ORT.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(session: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """Logits ``[batch, labels]`` for int64 ``[batch, seq]`` inputs (right-padded, 1 = token)."""
    feeds = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
    return session.run([OUTPUT_NAME], feeds)[0]


def onnx_step(session: Any, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One call of ``session`` on ``batch`` (its ``input_ids`` and ``attention_mask``), as the benchmarks time it."""

    def step() -> None:
        run_logits(session, batch["input_ids"], batch["attention_mask"])

    return step


class OnnxClassifier:
    """A ``coda export`` directory loaded for ONNX Runtime.

    Args:
        directory: the export directory (``model.onnx``, tokenizer files, ``coda_task.json``).
        int8: use ``model.int8.onnx`` (dynamic int8 quantisation) instead of ``model.onnx``.
        threads: ONNX Runtime intra-op threads (None: its default, one per core).
    """

    def __init__(self, directory: str | Path, *, int8: bool = False, threads: int | None = None) -> None:
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        self.path = self.directory / (INT8_NAME if int8 else ONNX_NAME)
        if not self.path.is_file():
            hint = "export with `coda export --int8`" if int8 else "not a `coda export` output directory"
            raise ValueError(f"{self.path}: no such file ({hint})")
        task = read_task(self.directory)
        self.label_names: list[str] = list(task["label_names"])
        self.max_length: int = int(task["max_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.directory)
        self.session = inference_session(self.path, threads)

    def predict_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, labels]`` of one already tokenised, right-padded batch."""
        return torch.from_numpy(run_logits(self.session, input_ids, attention_mask))

    def predict_probabilities(self, texts: list[str], batch_size: int) -> torch.Tensor:
        """Class probabilities ``[len(texts), labels]`` (float32) in the input order.

        Batches are formed as in ``coda eval`` (length-sorted, padded per batch), so the result matches
        :func:`coda_adapters.app.classify.predict_probabilities` on the PyTorch model.
        """
        if not texts:  # the tokenizer rejects an empty list
            return torch.zeros(0, len(self.label_names))
        return self.predict_encoded(self.encode(texts), batch_size)

    def encode(self, texts: list[str]) -> Encoded:
        """Token ids of ``texts``, truncated to the task's ``max_length`` (what ``coda eval`` does)."""
        return Encoded(self.tokenizer, list(texts), None, self.max_length)

    def predict_encoded(self, encoded: Encoded, batch_size: int) -> torch.Tensor:
        """Probabilities for texts already encoded with :meth:`encode` (kept apart so that timing can leave
        tokenisation out, as ``coda eval`` does for PyTorch)."""
        check_int("batch_size", batch_size, low=1)
        probabilities = torch.zeros(len(encoded), len(self.label_names))
        for indices in length_sorted_batches(encoded, batch_size):
            batch = encoded.batch(indices)
            logits = self.predict_logits(batch["input_ids"], batch["attention_mask"])
            probabilities[indices] = logits.float().softmax(-1)
        return probabilities


def evaluate_onnx(classifier: OnnxClassifier, data: LabelledTexts, batch_size: int) -> dict[str, Any]:
    """The metrics of :func:`coda_adapters.app.classify.evaluate` (accuracy, macro-F1, per class, confusion
    matrix, examples per second), computed with ONNX Runtime; ``runtime`` names the model file used."""
    encoded = classifier.encode(data.texts)
    start = time.perf_counter()
    probabilities = classifier.predict_encoded(encoded, batch_size)
    seconds = time.perf_counter() - start
    metrics = classification_metrics(data.labels, probabilities.argmax(-1).tolist(), classifier.label_names)
    metrics["eval_examples_per_second"] = len(data.texts) / seconds
    metrics["eval_examples"] = len(data.texts)
    metrics["runtime"] = f"onnxruntime ({classifier.path.name})"
    return metrics
