"""The engine behind ``coda serve``: adapters on shared frozen backbones, dynamic batching and metrics.

Nothing here knows about HTTP; :mod:`.serve` puts it behind a Starlette app.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import WEIGHTS_NAME, read_adapter_weights, read_coda_config
from ..config import check_choice, check_int, check_number
from ..model import CodaModel
from ..stacking import StackedCodaModel, check_stackable
from .bench import lower_precision
from .classify import Encoded, length_sorted_batches, predict_probabilities, read_task
from .options import SERVE_QUANTIZE_CHOICES, flag

logger = logging.getLogger("coda.serve")


@dataclass(frozen=True)
class ServeSettings:
    """How requests are batched and limited (the ``coda serve`` options of the same names)."""

    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    threads: int | None = None
    mix_adapters: bool = True
    quantize: str = "none"  # "bf16": every PyTorch adapter's weights in bfloat16 (as `coda eval --quantize bf16`)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes"):
            check_int(flag(name), getattr(self, name), low=1)
        check_choice(flag("quantize"), self.quantize, SERVE_QUANTIZE_CHOICES)
        if not isinstance(self.mix_adapters, bool):
            raise ValueError(f"{flag('mix_adapters')} must be True or False, got {self.mix_adapters!r}")
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
    directories: Mapping[str, str | Path], threads: int | None = None, quantize: str = "none"
) -> dict[str, ServedAdapter | OnnxServedAdapter]:
    """Load each ``coda train`` output; those naming the same base model share one copy of its weights.
    A ``coda export`` output (or one of its ``.onnx`` files) runs on ONNX Runtime with ``threads`` threads.

    The base model of each group is read once (a *reference*); every adapter then gets its own copy of
    the module tree whose frozen parameters are the reference's tensors (see :func:`attach_adapter`).
    ``quantize="bf16"`` then puts every PyTorch adapter's weights in bfloat16; ``Module.to`` converts a
    parameter in place (same ``Parameter`` object), so the shared frozen weights stay one copy.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .assets import resolve_model_path
    from .onnx_classifier import OnnxClassifier

    check_choice(flag("quantize"), quantize, SERVE_QUANTIZE_CHOICES)  # before loading anything

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
    for adapter in served.values():
        if isinstance(adapter, ServedAdapter):
            lower_precision(adapter.model, quantize)
    precision = "" if quantize == "none" else f"; PyTorch adapters in {quantize}"
    logger.info("loaded %d adapter(s) on %d backbone(s)%s", len(served), len(backbones), precision)
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
# Mixed-adapter model calls
# --------------------------------------------------------------------------------------------------


class MixedEncoded(Encoded):
    """The texts of several adapters, each part tokenized by its own adapter, with each row's adapter slot:
    its batches carry ``adapter_index`` ``[batch]`` for a :class:`~coda_adapters.stacking.StackedCodaModel`.

    Padding takes the first part's pad id; padded positions are masked, never routed and never pooled,
    so their id does not matter.
    """

    def __init__(self, parts: list[Encoded], slots: list[int]) -> None:  # the parts are tokenized already
        self.ids = [row for part in parts for row in part.ids]
        self.labels = None
        self.pad_id = parts[0].pad_id
        self.slots = [slot for part, slot in zip(parts, slots, strict=True) for _ in part.ids]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {**super().batch(indices), "adapter_index": torch.tensor([self.slots[i] for i in indices])}


@dataclass(eq=False)  # compared and hashed by identity: the batcher keys a window's model calls by group
class MixedAdapters:
    """Adapters that run together in one model call: their :class:`StackedCodaModel`, ``adapters[a]`` in slot ``a``."""

    adapters: list[ServedAdapter]
    model: StackedCodaModel

    @classmethod
    def build(cls, adapters: list[ServedAdapter]) -> MixedAdapters:
        return cls(list(adapters), StackedCodaModel([adapter.model for adapter in adapters]))

    def classify(
        self, texts: Mapping[str, list[str]], batch_size: int
    ) -> tuple[dict[str, tuple[torch.Tensor, list[int]]], int]:
        """For each adapter named in ``texts``: its probabilities ``[texts, labels]`` in input order and its
        number of texts in each model call; and the number of model calls.

        Each adapter's texts are tokenized as it does alone (its tokenizer and ``max_length``); then all the
        texts are sorted by length together and cut into batches of ``batch_size``, as
        :meth:`ServedAdapter.classify` does for one adapter. A padded label's probability is 0 and is cut off.
        """
        slots = {adapter.name: slot for slot, adapter in enumerate(self.adapters)}
        parts = [self._encode(slots[name], batch) for name, batch in texts.items()]
        encoded = MixedEncoded(parts, [slots[name] for name in texts])
        calls = length_sorted_batches(encoded, batch_size)
        probabilities, _ = predict_probabilities(self.model, encoded, batch_size)
        results = {}
        for name, (start, end) in zip(texts, _offsets([len(batch) for batch in texts.values()]), strict=True):
            shares = [sum(start <= i < end for i in call) for call in calls]
            results[name] = probabilities[start:end, : self.model.num_labels[slots[name]]], [n for n in shares if n]
        return results, len(calls)

    def _encode(self, slot: int, texts: list[str]) -> Encoded:
        adapter = self.adapters[slot]
        return Encoded(adapter.tokenizer, texts, None, adapter.max_length)


def mixed_groups(adapters: Mapping[str, ServedAdapter | OnnxServedAdapter]) -> dict[str, MixedAdapters]:
    """Per adapter that can share model calls with others, the :class:`MixedAdapters` it runs in.

    PyTorch adapters are grouped greedily, in order: each joins the first group whose first adapter
    it stacks with (:func:`~coda_adapters.stacking.check_stackable`), else starts one. Groups of one, and
    ONNX Runtime adapters, run in their own model calls; the log says which adapters mix and why the
    others do not.
    """
    groups: list[list[ServedAdapter]] = []
    for adapter in adapters.values():
        if not isinstance(adapter, ServedAdapter):
            logger.info("adapter %r runs in its own model calls: it runs on ONNX Runtime", adapter.name)
            continue
        reasons = [_stack_refusal(group[0], adapter) for group in groups]
        joined = next((group for group, reason in zip(groups, reasons, strict=True) if reason is None), None)
        if joined is not None:
            joined.append(adapter)
            continue
        groups.append([adapter])
        if reasons:
            logger.info("adapter %r cannot mix with %r: %s", adapter.name, groups[0][0].name, reasons[0])
    mixed = {}
    for group in groups:
        names = [adapter.name for adapter in group]
        if len(group) == 1:
            logger.info("adapter %r runs in its own model calls (grouped per adapter)", names[0])
            continue
        logger.info("adapters %s run mixed: one model call for all of them in a batching window", names)
        stacked = MixedAdapters.build(group)
        mixed.update(dict.fromkeys(names, stacked))
    return mixed


def _stack_refusal(first: ServedAdapter, adapter: ServedAdapter) -> str | None:
    """Why ``adapter`` should not run in one model call with ``first``, or None if it can.

    Adapters of different ``r`` would stack, but a routed batch is as long as its longest selection
    (``k_max``), so every example would pay for the smallest ``r``: they run in calls of their own.
    """
    if first.model.reduction != adapter.model.reduction:
        return (
            f"it routes at r = {adapter.model.reduction:g}, {first.name!r} at r = {first.model.reduction:g} "
            "(a mixed call would run every example at the smaller r's cost)"
        )
    try:
        check_stackable([first.model, adapter.model])
    except ValueError as error:
        return str(error)
    return None


# --------------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition format, written by hand: a few counters and histograms)
# --------------------------------------------------------------------------------------------------

CALL_MODES = ("mixed", "single")
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
        self.model_calls: Counter[str] = Counter(dict.fromkeys(CALL_MODES, 0))

    def render(self, queue_depth: Mapping[str, int]) -> str:
        out = ["# HELP coda_requests_total Classification requests answered, by adapter and HTTP status."]
        out.append("# TYPE coda_requests_total counter")
        for (adapter, status), count in sorted(self.requests.items()):
            out.append(f'coda_requests_total{{adapter="{_escape(adapter)}",status="{status}"}} {count}')
        out.append("# HELP coda_batch_size Texts per model call (a mixed call counts each adapter's own texts).")
        out.append("# TYPE coda_batch_size histogram")
        for name in self.adapters:
            out += self.batch_sizes[name].lines("coda_batch_size", f'adapter="{_escape(name)}"')
        out += ["# HELP coda_queue_depth Texts waiting for the model.", "# TYPE coda_queue_depth gauge"]
        out += [f'coda_queue_depth{{adapter="{_escape(name)}"}} {queue_depth.get(name, 0)}' for name in self.adapters]
        out.append("# HELP coda_request_duration_seconds Time from receiving a classification request to answering.")
        out.append("# TYPE coda_request_duration_seconds histogram")
        for name in self.adapters:
            out += self.latency[name].lines("coda_request_duration_seconds", f'adapter="{_escape(name)}"')
        out.append("# HELP coda_model_calls_total Model calls: mixed (several adapters in one call) or single (one).")
        out.append("# TYPE coda_model_calls_total counter")
        out += [f'coda_model_calls_total{{mode="{mode}"}} {count}' for mode, count in sorted(self.model_calls.items())]
        # the standard process metric: CPU of every thread (the event loop, the worker, torch's pool), which
        # `coda loadtest` divides by the texts answered
        out.append("# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.")
        out.append("# TYPE process_cpu_seconds_total counter")
        out.append(f"process_cpu_seconds_total {time.process_time()!r}")
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
    batches). Within a window, adapters that stack (same frozen base and shapes, see
    :func:`mixed_groups`) run together in one model call, each text with its own adapter, when
    ``settings.mix_adapters``; every other adapter's texts run in calls of their own ("grouped per
    adapter"). Either way the texts of a call are sorted by length and cut into batches.
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
        self.mixed = mixed_groups(adapters) if settings.mix_adapters else {}

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

    def _compute(self, jobs: list[Job]) -> tuple[dict[str, Outcome], Counter[str]]:
        """On the worker thread: the window's model calls, each error kept to the adapters of its call; and
        how many model calls ran in each mode."""
        outcomes, calls = {}, Counter()
        for names in self._model_calls(jobs):
            groups = {name: [job for job in jobs if job.adapter == name] for name in names}
            try:
                results, count = self._classify({name: _texts(group) for name, group in groups.items()})
                calls["mixed" if len(names) > 1 else "single"] += count
                for name, (probabilities, sizes) in results.items():
                    bounds = _offsets([len(job.texts) for job in groups[name]])
                    outcomes[name] = Outcome([probabilities[start:end] for start, end in bounds], sizes)
            except Exception as error:
                logger.exception("classification with adapter(s) %s failed", ", ".join(map(repr, names)))
                failure = ModelError(f"{type(error).__name__}: {error}")
                failure.__cause__ = error
                outcomes.update({name: Outcome(error=failure) for name in names})
        return outcomes, calls

    def _model_calls(self, jobs: list[Job]) -> list[list[str]]:
        """The window's adapters, in order of arrival, as they run: those of one mixed group together, every
        other one alone."""
        calls: dict[MixedAdapters | str, list[str]] = {}
        for name in dict.fromkeys(job.adapter for job in jobs):
            calls.setdefault(self.mixed.get(name, name), []).append(name)
        return list(calls.values())

    def _classify(self, texts: dict[str, list[str]]) -> tuple[dict[str, tuple[torch.Tensor, list[int]]], int]:
        """Per adapter: probabilities and texts per model call; and the number of model calls. One adapter runs
        as it always has (:meth:`ServedAdapter.classify`); several run in their group's stacked model."""
        size = self.settings.max_batch_size
        if len(texts) > 1:
            return self.mixed[next(iter(texts))].classify(texts, size)
        ((name, batch),) = texts.items()
        probabilities, sizes = self.adapters[name].classify(batch, size)
        return {name: (probabilities, sizes)}, len(sizes)

    def _deliver(self, jobs: list[Job], computed: tuple[dict[str, Outcome], Counter[str]]) -> None:
        outcomes, calls = computed
        self.metrics.model_calls.update(calls)
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


def _texts(jobs: list[Job]) -> list[str]:
    return [text for job in jobs for text in job.texts]


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
