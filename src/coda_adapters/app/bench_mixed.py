"""``coda bench-mixed-adapters``: one model call that mixes adapters against one adapter's call, side by side.

``adapters`` MiniLM classifiers at the same reduction are built with random trainable weights (the work
per call depends on shapes only; see :mod:`.loadtest`) and loaded as ``coda serve`` loads them, sharing
one frozen backbone. On one batch of ``batch_size`` BBC News texts of exactly ``seq_len`` tokens, three
steps are timed interleaved (:func:`.bench.time_interleaved`):

- ``single``: one adapter's plain :class:`~coda_adapters.CodaModel` on the whole batch (the best case:
  every request of the window is for one adapter);
- ``mixed``: the :class:`~coda_adapters.StackedCodaModel` on the same batch, example ``b`` with adapter
  ``b mod adapters`` (what ``coda serve --mix-adapters`` runs for a window mixing the adapters);
- ``grouped``: one call per adapter on its examples (what ``--no-mix-adapters`` runs for that window).

The ratios are throughputs against ``single``; the issue's target is ``mixed / single >= 0.9``.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

STEPS = ("single", "mixed", "grouped")


def mixed_adapter_report(
    *,
    model: str = "minilm",
    adapters: int = 8,
    batch_size: int = 8,
    seq_len: int = 256,
    reduction: float = 3.0,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 2,
) -> dict[str, Any]:
    """Median milliseconds per call of each step, texts per second, ratios to ``single`` and the largest
    difference between the mixed call's probabilities and each adapter's own."""
    from .bench import time_interleaved
    from .classify import Encoded
    from .loadtest import build_random_adapter, request_texts
    from .serving import MixedAdapters, load_adapters

    torch.set_num_threads(threads)
    texts, labels = request_texts(model, seq_len, batch_size)
    with tempfile.TemporaryDirectory(prefix="coda-bench-mixed-") as root:
        directories = {f"a{slot}": Path(root) / f"a{slot}" for slot in range(adapters)}
        for slot, directory in enumerate(directories.values()):
            build_random_adapter(directory, model, reduction, labels, seq_len, seed=slot)
        served = list(load_adapters(directories).values())
    group = MixedAdapters.build(served)
    batch = Encoded(served[0].tokenizer, texts, None, seq_len).batch(list(range(len(texts))))
    index = torch.arange(len(texts)) % adapters
    per_adapter = [(served[slot].model, rows_of(batch, index == slot)) for slot in range(min(adapters, len(texts)))]
    steps = {
        "single": lambda: served[0].model(**batch),
        "mixed": lambda: group.model(**batch, adapter_index=index),
        "grouped": lambda: [model(**inputs) for model, inputs in per_adapter],
    }
    with torch.inference_mode():
        times = time_interleaved(steps, repeats, warmup)
        difference = largest_probability_difference(group, served, batch, index)
    medians = {name: statistics.median(times[name]) for name in STEPS}
    return {
        "model": model,
        "adapters": adapters,
        "batch_size": len(texts),
        "seq_len": int(batch["input_ids"].shape[1]),
        "reduction": reduction,
        "threads": threads,
        "repeats": repeats,
        "ms": {name: 1e3 * seconds for name, seconds in medians.items()},
        "texts_per_s": {name: len(texts) / seconds for name, seconds in medians.items()},
        "throughput_vs_single": {name: medians["single"] / seconds for name, seconds in medians.items()},
        "largest_probability_difference": difference,
    }


def rows_of(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The examples ``rows`` (bool ``[batch]``) of a batch of model inputs."""
    return {name: value[rows] for name, value in batch.items()}


def largest_probability_difference(
    group: Any, served: list[Any], batch: dict[str, torch.Tensor], index: torch.Tensor
) -> float:
    """Between the mixed call's probabilities and each adapter's own call on its examples."""
    mixed = group.model(**batch, adapter_index=index).logits.softmax(-1)
    largest = 0.0
    for slot, adapter in enumerate(served):
        rows = index == slot
        if rows.any():
            alone = adapter.model(**rows_of(batch, rows)).logits.softmax(-1)
            largest = max(largest, float((mixed[rows, : alone.shape[-1]] - alone).abs().max()))
    return largest


def format_mixed_adapter_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}, {report['adapters']} adapters at r = {report['reduction']:g}, batch "
        f"{report['batch_size']} x {report['seq_len']} tokens, {report['threads']} thread(s), median of "
        f"{report['repeats']}",
        "| step | ms per batch | texts/s | throughput vs single |",
        "|---|---|---|---|",
    ]
    for name in STEPS:
        lines.append(
            f"| {name} | {report['ms'][name]:.1f} | {report['texts_per_s'][name]:.1f} | "
            f"{report['throughput_vs_single'][name]:.2f}x |"
        )
    lines.append(
        f"largest probability difference, mixed vs each adapter alone: {report['largest_probability_difference']:.1e}"
    )
    return "\n".join(lines)
