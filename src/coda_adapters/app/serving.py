"""The engine behind ``coda serve``: adapters on shared frozen backbones, dynamic batching and metrics.

Nothing here knows about HTTP; :mod:`.serve` puts it behind a Starlette app.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import WEIGHTS_NAME, read_adapter_weights, read_coda_config
from ..config import check_int, check_number
from ..model import CodaModel
from .classify import Encoded, length_sorted_batches, predict_probabilities, read_task
from .options import flag

logger = logging.getLogger("coda.serve")


@dataclass(frozen=True)
class ServeSettings:
    """How requests are batched and limited (the ``coda serve`` options of the same names)."""

    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes"):
            check_int(flag(name), getattr(self, name), low=1)
        if self.threads is not None:
            check_int(flag("threads"), self.threads, low=1)
        check_number(flag("max_wait_ms"), self.max_wait_ms, low=0)


# --------------------------------------------------------------------------------------------------
# Adapters on shared backbones
# --------------------------------------------------------------------------------------------------


@dataclass
class ServedAdapter:
    """One classifier being served: its model (sharing frozen weights with others), tokenizer and task."""

    name: str
    model: CodaModel
    tokenizer: Any
    label_names: list[str]
    max_length: int

    def classify(self, texts: list[str], batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """Probabilities ``[texts, labels]`` in input order, and the size of each model call.

        The texts are sorted by length and cut into batches of ``batch_size`` (less padding), exactly
        as ``coda predict`` does, so a request answers what the command line would.
        """
        encoded = Encoded(self.tokenizer, texts, None, self.max_length)
        sizes = [len(batch) for batch in length_sorted_batches(encoded, batch_size)]
        probabilities, _ = predict_probabilities(self.model, encoded, batch_size)
        return probabilities, sizes


@dataclass
class OnnxServedAdapter:
    """A ``coda export`` output served with ONNX Runtime (no PyTorch model): what :class:`ServedAdapter` answers."""

    name: str
    classifier: Any  # onnx_classifier.OnnxClassifier

    @property
    def label_names(self) -> list[str]:
        return self.classifier.label_names

    @property
    def max_length(self) -> int:
        return self.classifier.max_length

    def classify(self, texts: list[str], batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """As :meth:`ServedAdapter.classify`: probabilities in input order, and the size of each model call."""
        encoded = self.classifier.encode(texts)
        sizes = [len(batch) for batch in length_sorted_batches(encoded, batch_size)]
        return self.classifier.predict_encoded(encoded, batch_size), sizes


def onnx_export_of(path: str | Path) -> tuple[Path, bool] | None:
    """``(export directory, int8?)`` if ``path`` is a ``coda export`` directory (served as its ``model.onnx``)
    or one of its ``.onnx`` files (``model.int8.onnx``: the int8 graph); None for a ``coda train`` output."""
    from .onnx_classifier import INT8_NAME, ONNX_NAME

    path = Path(path)
    if path.is_file() and path.name in (ONNX_NAME, INT8_NAME):
        return path.parent, path.name == INT8_NAME
    if (path / ONNX_NAME).is_file():
        return path, False
    return None


def load_adapters(
    directories: Mapping[str, str | Path], threads: int | None = None
) -> dict[str, ServedAdapter | OnnxServedAdapter]:
    """Load each ``coda train`` output; those naming the same base model share one copy of its weights.
    A ``coda export`` output (or one of its ``.onnx`` files) runs on ONNX Runtime with ``threads`` threads.

    The base model of each group is read once (a *reference*); every adapter then gets its own copy of
    the module tree whose frozen parameters are the reference's tensors (see :func:`attach_adapter`).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .assets import resolve_model_path
    from .onnx_classifier import OnnxClassifier

    backbones: dict[str, tuple[nn.Module, Any]] = {}
    served: dict[str, ServedAdapter | OnnxServedAdapter] = {}
    for name, directory in directories.items():
        export = onnx_export_of(directory)
        if export is not None:
            served[name] = OnnxServedAdapter(name, OnnxClassifier(export[0], int8=export[1], threads=threads))
            continue
        task = read_task(directory)
        num_labels = len(task["label_names"])
        path = resolve_model_path(task["model"])
        key = os.path.realpath(path)
        if key not in backbones:
            reference = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()
            backbones[key] = (reference, AutoTokenizer.from_pretrained(path))
        reference, tokenizer = backbones[key]
        model = attach_adapter(reference, directory, num_labels)
        served[name] = ServedAdapter(name, model, tokenizer, list(task["label_names"]), int(task["max_length"]))
    logger.info("loaded %d adapter(s) on %d backbone(s)", len(served), len(backbones))
    return served


def attach_adapter(reference: nn.Module, directory: str | Path, num_labels: int) -> CodaModel:
    """The adapter in ``directory`` on a copy of ``reference`` that shares its frozen parameters.

    ``copy.deepcopy`` with a memo pre-filled with ``{id(p): p}`` puts the very same Parameter objects
    in the copy; every other object (modules, buffers, config, the head) is copied. The parameters
    the adapter file holds (task head and the like) are left out of the memo: loading them writes in
    place and must not reach the reference or another adapter. A ``modules_to_save`` inside a routed
    layer is renamed by the wrapping, so its saved name does not exclude it: that is caught after
    wrapping and before loading, and such an adapter gets a private copy of everything instead.
    """
    saved = read_adapter_weights(Path(directory) / WEIGHTS_NAME)
    shared = {id(p): p for name, p in reference.named_parameters() if name not in saved}
    model = _wrap(copy.deepcopy(reference, memo=dict(shared)), directory, saved, num_labels, shared)
    if model is None:
        logger.warning("%s: a trainable parameter would be shared; this adapter gets its own backbone", directory)
        for parameter in shared.values():  # wrapping switched some of them on: the reference stays frozen
            parameter.requires_grad_(False)
        model = _wrap(copy.deepcopy(reference), directory, saved, num_labels, {})
    return model


def _wrap(
    base: nn.Module, directory: str | Path, saved: dict[str, torch.Tensor], num_labels: int, shared: dict[int, Any]
) -> CodaModel | None:
    """``CodaModel.from_pretrained`` in two steps, to check between them that no trainable parameter is in
    ``shared`` (None then): the load copies into the trainable parameters in place."""
    _fit_head(base, saved, num_labels)
    model = CodaModel(base, read_coda_config(directory, base))
    if any(p.requires_grad and id(p) in shared for p in model.parameters()):
        return None
    model.load_trainable_state_dict(saved, source=Path(directory) / WEIGHTS_NAME)
    return model.eval()


def _fit_head(base: nn.Module, saved: dict[str, torch.Tensor], num_labels: int) -> None:
    """Give the copied head as many outputs as this adapter has labels.

    The reference was built with the first adapter's label count; another task on the same backbone
    may have a different one. Only parameters the adapter file will overwrite, and only their output
    dimension (dim 0, ``num_labels`` long), are resized: the result is what ``from_pretrained(path,
    num_labels=n)`` gives, before the saved head is copied in.
    """
    base.config.num_labels = num_labels
    parameters = dict(base.named_parameters())
    for name, tensor in saved.items():
        current = parameters.get(name)
        if current is None or current.shape == tensor.shape:
            continue
        if tensor.shape[1:] != current.shape[1:] or tensor.shape[0] != num_labels:
            continue  # a genuine mismatch: CodaModel.from_pretrained reports it with the file's name
        module_name, _, attribute = name.rpartition(".")
        module = base.get_submodule(module_name)
        setattr(module, attribute, nn.Parameter(torch.empty(tensor.shape, dtype=current.dtype)))
        if isinstance(module, nn.Linear) and attribute == "weight":
            module.out_features = num_labels


# --------------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition format, written by hand: a few counters and histograms)
# --------------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, metric: str, labels: str) -> list[str]:
        lines = [
            f'{metric}_bucket{{{labels},le="{_number(bound)}"}} {count}'
            for bound, count in zip(self.buckets, self.counts, strict=True)
        ]
        lines.append(f'{metric}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines += [f"{metric}_sum{{{labels}}} {_number(self.sum)}", f"{metric}_count{{{labels}}} {self.count}"]
        return lines


class Metrics:
    """Per adapter: requests by status, texts per model call, queue depth and request latency.

    Updated only on the event loop (the worker thread hands its batch sizes back), so no locks.
    Requests that name no served adapter (bad JSON, unknown name) count under ``adapter=""``.
    """

    def __init__(self, adapters: list[str], max_batch_size: int) -> None:
        self.adapters = adapters
        self.requests: Counter[tuple[str, int]] = Counter()
        sizes = sorted({2**i for i in range(max_batch_size.bit_length()) if 2**i <= max_batch_size} | {max_batch_size})
        self.batch_sizes = {name: Histogram(tuple(sizes)) for name in adapters}
        self.latency = {name: Histogram(LATENCY_BUCKETS) for name in adapters}

    def render(self, queue_depth: Mapping[str, int]) -> str:
        out = ["# HELP coda_requests_total Classification requests answered, by adapter and HTTP status."]
        out.append("# TYPE coda_requests_total counter")
        for (adapter, status), count in sorted(self.requests.items()):
            out.append(f'coda_requests_total{{adapter="{_escape(adapter)}",status="{status}"}} {count}')
        out += ["# HELP coda_batch_size Texts per model call.", "# TYPE coda_batch_size histogram"]
        for name in self.adapters:
            out += self.batch_sizes[name].lines("coda_batch_size", f'adapter="{_escape(name)}"')
        out += ["# HELP coda_queue_depth Texts waiting for the model.", "# TYPE coda_queue_depth gauge"]
        out += [f'coda_queue_depth{{adapter="{_escape(name)}"}} {queue_depth.get(name, 0)}' for name in self.adapters]
        out.append("# HELP coda_request_duration_seconds Time from receiving a classification request to answering.")
        out.append("# TYPE coda_request_duration_seconds histogram")
        for name in self.adapters:
            out += self.latency[name].lines("coda_request_duration_seconds", f'adapter="{_escape(name)}"')
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --------------------------------------------------------------------------------------------------
# Dynamic batching
# --------------------------------------------------------------------------------------------------


class QueueFull(Exception):
    """No room for the request (or the server is stopping): answer 503 and let the client retry."""


class ModelError(Exception):
    """Classification failed in model code (logged with its traceback once per window): answer 500."""


@dataclass
class Job:
    adapter: str
    texts: list[str]
    future: asyncio.Future
    enqueued: float


@dataclass
class Outcome:
    """What the worker thread computed for one adapter's jobs in a window: rows per job, or the error."""

    rows: list[torch.Tensor] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    error: BaseException | None = None


class Batcher:
    """Queue requests and run them in batching windows on one worker thread.

    A window opens when a request arrives and closes when ``max_batch_size`` texts wait or
    ``max_wait_ms`` has passed since its first request; it takes whole requests from the front of the
    queue, up to ``max_batch_size`` texts (a larger single request is taken alone and cut into
    batches). Within a window the texts are grouped per adapter — the simplest correct design: one
    model call never mixes adapters — and each group is sorted by length and cut into batches.
    While the worker runs, new requests queue up (at most ``max_queue`` texts), so under load the next
    window is full at once. Model work runs off the event loop, which keeps accepting and answering.
    """

    def __init__(
        self, adapters: Mapping[str, ServedAdapter | OnnxServedAdapter], settings: ServeSettings, metrics: Metrics
    ) -> None:
        self.adapters = adapters
        self.settings = settings
        self.metrics = metrics
        self.pending: Counter[str] = Counter()
        self._jobs: deque[Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    def start(self) -> None:
        """Start the batching loop on the running event loop (idempotent; also done by the first submit)."""
        if self._task is not None and not self._task.done():
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        threads = self.settings.threads
        # one thread: torch parallelises inside a batch; two model calls at once would only compete
        self._executor = ThreadPoolExecutor(1, "coda-serve", initializer=_set_threads, initargs=(threads,))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="coda-serve-batcher")

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop the loop and the worker thread."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            try:
                await self._task
            except Exception:  # the loop catches everything per window; this is only a last resort
                logger.exception("the batching loop failed")
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def submit(self, adapter: str, texts: list[str]) -> asyncio.Future:
        """Queue ``texts`` for ``adapter``; the future gets the probability rows, in order."""
        if self._closing:
            raise QueueFull("the server is shutting down")
        waiting = sum(self.pending.values())
        if waiting + len(texts) > self.settings.max_queue:
            raise QueueFull(f"the queue is full ({waiting} texts waiting, at most {self.settings.max_queue})")
        self.start()
        loop = asyncio.get_running_loop()
        job = Job(adapter, texts, loop.create_future(), loop.time())
        self._jobs.append(job)
        self.pending[adapter] += len(texts)
        self._wakeup.set()
        return job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._jobs or not self._closing:
            if not self._jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            jobs = await self._take_window()
            try:
                self._deliver(jobs, await loop.run_in_executor(self._executor, self._compute, jobs))
            except Exception as error:  # the loop must outlive anything: fail this window, keep serving
                logger.exception("a batching window failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)

    async def _take_window(self) -> list[Job]:
        deadline = self._jobs[0].enqueued + self.settings.max_wait_ms / 1000
        loop = asyncio.get_running_loop()
        while sum(self.pending.values()) < self.settings.max_batch_size and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        jobs, size = [], 0
        while self._jobs and (not jobs or size + len(self._jobs[0].texts) <= self.settings.max_batch_size):
            job = self._jobs.popleft()
            jobs.append(job)
            size += len(job.texts)
            self.pending[job.adapter] -= len(job.texts)
        return jobs

    def _compute(self, jobs: list[Job]) -> dict[str, Outcome]:
        """On the worker thread: one classification per adapter of the window, each error kept to its group."""
        outcomes = {}
        for adapter in dict.fromkeys(job.adapter for job in jobs):
            group = [job for job in jobs if job.adapter == adapter]
            texts = [text for job in group for text in job.texts]
            try:
                probabilities, sizes = self.adapters[adapter].classify(texts, self.settings.max_batch_size)
                bounds = _offsets([len(job.texts) for job in group])
                rows = [probabilities[start:end] for start, end in bounds]
                outcomes[adapter] = Outcome(rows, sizes)
            except Exception as error:
                logger.exception("classification with adapter %r failed", adapter)
                failure = ModelError(f"{type(error).__name__}: {error}")
                failure.__cause__ = error
                outcomes[adapter] = Outcome(error=failure)
        return outcomes

    def _deliver(self, jobs: list[Job], outcomes: dict[str, Outcome]) -> None:
        for adapter, outcome in outcomes.items():
            for size in outcome.batch_sizes:
                self.metrics.batch_sizes[adapter].observe(size)
        rows = {adapter: iter(outcome.rows) for adapter, outcome in outcomes.items()}
        for job in jobs:
            outcome = outcomes[job.adapter]
            row = None if outcome.error is not None else next(rows[job.adapter])  # taken even if unused
            if job.future.done():  # the client went away
                continue
            if outcome.error is not None:
                job.future.set_exception(outcome.error)
            else:
                job.future.set_result(row)


def _offsets(lengths: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    return bounds


def _set_threads(threads: int | None) -> None:
    """Worker-thread initialiser: OpenMP's thread count is per calling thread, so set it here too."""
    if threads is not None:
        torch.set_num_threads(threads)
