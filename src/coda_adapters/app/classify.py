"""Fine-tuning and evaluation of CoDA text classifiers, with checkpoints that survive a crash.

The loop is plain PyTorch driven by ``accelerate``, so the same code runs in one process or under
``accelerate launch`` (DDP; gloo on CPU, NCCL on GPUs): ``--batch-size`` is the global batch, split
across processes.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import WEIGHTS_NAME, read_coda_config
from ..config import CodaConfig
from ..files import read_json_object, read_tensors, write_json, write_tensors
from ..model import CodaModel, get_coda_model
from ..version import __version__
from .data import ClassificationData, LabelledTexts, stratified_split

TASK_NAME = "coda_task.json"
METRICS_NAME = "metrics.json"
CHECKPOINTS = "checkpoints"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); the last good checkpoint is kept."""


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and decay and gradient clipping, on batches of texts cut to ``max_length``."""

    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        check_int_option("batch_size", self.batch_size)
        check_int_option("max_length", self.max_length)
        for name in ("lr", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "warmup_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {value!r}")


@dataclass
class TrainConfig(OptimizerConfig):
    """Fine-tuning: ``epochs`` passes, evaluation on a ``val_size`` split and a checkpoint after each."""

    epochs: int = 3
    val_size: float = 0.1
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int_option("epochs", self.epochs)
        check_int_option("eval_batch_size", self.eval_batch_size)
        if not (isinstance(self.val_size, (int, float)) and 0 <= self.val_size < 1):
            raise ValueError(f"--val-size must be in [0, 1) (0 = no validation split), got {self.val_size!r}")


def check_int_option(name: str, value: Any, low: int = 1) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Building and loading classifiers
# --------------------------------------------------------------------------------------------------


def build_classifier(
    model: str, coda_config: CodaConfig, label_names: list[str], dropout: float | None = None
) -> tuple[CodaModel, Any]:
    """A CoDA sequence classifier over a bundled model name or a local model directory, and its tokenizer.

    ``dropout`` overrides the model's hidden, attention and classifier dropout (None keeps its own).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .assets import resolve_model_path

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    overrides = {}
    if dropout is not None:
        if not 0 <= dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {dropout}")
        overrides = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    base = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        **overrides,
    )
    return get_coda_model(base, coda_config), tokenizer


def save_task(directory: Path, model: str, label_names: list[str], max_length: int) -> None:
    """``coda_task.json``: what a saved classifier needs beyond the adapter (base model, labels, length)."""
    document = {"model": model, "label_names": label_names, "max_length": max_length, "library_version": __version__}
    write_json(directory / TASK_NAME, document)


def read_task(directory: str | Path) -> dict[str, Any]:
    missing = f"not a classifier made by `coda train`, which writes {TASK_NAME}"
    return read_json_object(Path(directory) / TASK_NAME, ("model", "label_names", "max_length"), missing)


def load_classifier(directory: str | Path) -> tuple[CodaModel, Any, dict[str, Any]]:
    """A classifier saved by ``coda train``: ``(model in eval mode, tokenizer, task)``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .assets import resolve_model_path

    task = read_task(directory)
    path = resolve_model_path(task["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(task["label_names"]))
    return CodaModel.from_pretrained(base, directory).eval(), tokenizer, task


def load_backbone_adapter(model: CodaModel, directory: str | Path) -> CodaConfig:
    """Initialise routers and adapters from a ``coda pretrain`` output (saved on the bare backbone)."""
    directory = Path(directory)
    config = read_coda_config(directory, model.model)
    weights_path = directory / WEIGHTS_NAME
    prefix = model.model.base_model_prefix + "."
    own = model.trainable_state_dict()
    tensors = {}
    for name, tensor in read_tensors(weights_path).items():
        target = name if name in own else prefix + name
        if target not in own or own[target].shape != tensor.shape:
            raise ValueError(f"{weights_path}: {name} {tuple(tensor.shape)} has no counterpart in this model")
        tensors[target] = tensor
    with torch.no_grad():
        for name, parameter in model.model.named_parameters():
            if name in tensors:
                parameter.copy_(tensors[name])
    return config


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


class Encoded:
    """Token ids of a list of texts (truncated to ``max_length``), padded per batch."""

    def __init__(self, tokenizer: Any, texts: list[str], labels: list[int] | None, max_length: int) -> None:
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.labels = labels
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in indices])
        return batch


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of the seed and the epoch only (for --resume)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def epoch_batches(size: int, config: TrainConfig, epoch: int, min_size: int) -> list[list[int]]:
    """Global batches of one epoch; a last batch smaller than ``min_size`` (the process count) joins the one before."""
    order = epoch_order(size, config.seed, epoch)
    batches = [order[i : i + config.batch_size] for i in range(0, size, config.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        batches[-2].extend(batches.pop())
    return batches


def length_sorted_batches(encoded: Encoded, batch_size: int) -> list[list[int]]:
    """Batches of similar length (less padding) for evaluation; the order does not change the results."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.ids[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def predict_probabilities(model: nn.Module, encoded: Encoded, batch_size: int) -> tuple[torch.Tensor, float]:
    """Class probabilities ``[examples, labels]`` in the input order, and the examples per second."""
    model.eval()
    probabilities: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for indices in length_sorted_batches(encoded, batch_size):
            batch = encoded.batch(indices)
            batch.pop("labels", None)
            logits = model(**batch).logits.float()
            for i, row in zip(indices, logits.softmax(-1), strict=True):
                probabilities[i] = row
    seconds = time.perf_counter() - start
    return torch.stack([probabilities[i] for i in range(len(encoded))]), len(encoded) / seconds


def classification_metrics(labels: list[int], predictions: list[int], label_names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    label_ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=label_ids, zero_division=0
    )
    correct = sum(int(a == b) for a, b in zip(labels, predictions, strict=True))
    return {
        "accuracy": correct / len(labels),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(labels, predictions, labels=label_ids).tolist(),
    }


def evaluate(
    model: nn.Module, tokenizer: Any, data: LabelledTexts, label_names: list[str], max_length: int, batch_size: int
) -> dict[str, Any]:
    encoded = Encoded(tokenizer, data.texts, data.labels, max_length)
    probabilities, examples_per_second = predict_probabilities(model, encoded, batch_size)
    metrics = classification_metrics(data.labels, probabilities.argmax(-1).tolist(), label_names)
    metrics["eval_examples_per_second"] = examples_per_second
    metrics["eval_examples"] = len(data.texts)
    return metrics


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    out_dir: Path, model: CodaModel, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any]
) -> Path:
    """Write ``checkpoints/epoch-N`` through a temporary directory renamed at the end, then drop older ones.

    Every file is flushed and fsynced before the rename, so a crash leaves either the previous
    checkpoint or the new one, never half of one.
    """
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{state['epoch']}"
    temporary = root / f".tmp-epoch-{state['epoch']}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    model.save_pretrained(temporary)
    tensors = optimizer_tensors(model, optimizer)
    tensors["torch_rng_state"] = torch.get_rng_state()
    write_tensors(temporary / OPTIMIZER_NAME, tensors)
    write_json(temporary / TRAINER_STATE_NAME, {**state, "scheduler": scheduler.state_dict()})
    _fsync_directory(temporary)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    _fsync_directory(root)
    for older in completed_checkpoints(out_dir)[:-1]:
        shutil.rmtree(older, ignore_errors=True)
    return final


def completed_checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("epoch-*") if (p / TRAINER_STATE_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def optimizer_tensors(model: CodaModel, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's moments by parameter name, as plain tensors (safetensors, no pickle)."""
    names = {id(p): name for name, p in model.model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                tensors[f"{names[id(parameter)]}::{key}"] = torch.as_tensor(value).detach().clone().cpu()
    return tensors


def restore_optimizer(model: CodaModel, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.model.named_parameters())
    for key, value in tensors.items():
        if key == "torch_rng_state":
            continue
        name, _, field = key.partition("::")
        if name not in parameters:
            raise ValueError(f"checkpoint optimizer state names {name!r}, which this model does not have")
        optimizer.state[parameters[name]][field] = value.clone()


def _fsync_directory(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train_classifier(
    model: CodaModel,
    tokenizer: Any,
    data: ClassificationData,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    model_name: str,
    resume: bool = False,
    extra_metrics: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data.train`` (minus a validation split), evaluate on ``data.test`` and
    save the adapter, ``coda_task.json`` and ``metrics.json`` in ``out_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from transformers import get_linear_schedule_with_warmup

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # find_unused_parameters: with a [CLS]-pooled head the last layer's router gets no gradient
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    torch.manual_seed(config.seed)
    train_part, val_part = split_validation(data.train, config)
    check_labels(train_part, len(data.label_names))
    encoded = Encoded(tokenizer, train_part.texts, train_part.labels, config.max_length)
    steps_per_epoch = len(epoch_batches(len(encoded), config, 0, min_size=accelerator.num_processes))
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"--batch-size {config.batch_size} must divide among {accelerator.num_processes} processes")

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)

    history: list[dict[str, Any]] = []
    start_epoch, train_seconds = 0, 0.0
    if resume:
        start_epoch, train_seconds, history = resume_from_checkpoint(out_dir, model, optimizer, scheduler)
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    for epoch in range(start_epoch, config.epochs):
        batches = epoch_batches(len(encoded), config, epoch, min_size=accelerator.num_processes)
        wrapped.train()
        epoch_start = time.perf_counter()
        progress = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            disable=not (show_progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        seen, loss_sum = 0, 0.0
        for indices in progress:
            batch = shard(encoded.batch(indices), accelerator)
            loss = wrapped(**batch).loss
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1}; stopped, the last good checkpoint "
                    f"in {out_dir / CHECKPOINTS} is kept"
                )
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(indices)
            loss_sum += loss.item() * len(indices)
            elapsed = time.perf_counter() - epoch_start
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", ex_per_s=f"{seen / elapsed:.1f}")
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "epoch_seconds": epoch_seconds}
        if val_part is not None:
            val = evaluate(model, tokenizer, val_part, data.label_names, config.max_length, config.eval_batch_size)
            record.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"])
        history.append(record)
        if accelerator.is_main_process:
            state = {"epoch": epoch + 1, "train_seconds": train_seconds, "history": history, "config": asdict(config)}
            save_checkpoint(out_dir, model, optimizer, scheduler, state)
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
        accelerator.wait_for_everyone()

    metrics = {}
    if accelerator.is_main_process:
        test = evaluate(model, tokenizer, data.test, data.label_names, config.max_length, config.eval_batch_size)
        metrics = {
            **test,
            "reduction": model.coda_config.reduction,
            "train_seconds": train_seconds,
            "epoch_seconds": [r["epoch_seconds"] for r in history],
            "train_examples": len(train_part.texts),
            "validation_examples": 0 if val_part is None else len(val_part.texts),
            "history": history,
            "data": data.source,
            "label_names": data.label_names,
            "train_config": asdict(config),
            "coda_config": model.coda_config.to_dict(),
            "trainable_parameters": model.get_nb_trainable_parameters()[0],
            "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "versions": library_versions(model_name),
            **(extra_metrics or {}),
        }
        model.save_pretrained(out_dir)
        save_task(out_dir, model_name, data.label_names, config.max_length)
        write_json(out_dir / METRICS_NAME, metrics)
    accelerator.wait_for_everyone()
    return metrics


def shard(batch: dict[str, torch.Tensor], accelerator: Any) -> dict[str, torch.Tensor]:
    """This process's slice of a global batch, on its device (DDP then averages the gradients)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        per = math.ceil(batch["input_ids"].shape[0] / world)
        batch = {key: value[rank * per : (rank + 1) * per] for key, value in batch.items()}
    return {key: value.to(accelerator.device) for key, value in batch.items()}


def split_validation(train: LabelledTexts, config: TrainConfig) -> tuple[LabelledTexts, LabelledTexts | None]:
    if config.val_size == 0:
        return train, None
    return stratified_split(train, config.val_size, config.seed, what="--val-size")


def check_labels(data: LabelledTexts, num_labels: int) -> None:
    for i, label in enumerate(data.labels):
        if not 0 <= label < num_labels:
            raise ValueError(f"training example {i} has label {label}, outside 0..{num_labels - 1}")


def resume_from_checkpoint(
    out_dir: Path, model: CodaModel, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, float, list[dict[str, Any]]]:
    """Restore the newest complete checkpoint; returns ``(epochs done, train seconds, history)``."""
    checkpoints = completed_checkpoints(out_dir)
    if not checkpoints:
        raise ValueError(f"--resume: no complete checkpoint in {out_dir / CHECKPOINTS}")
    latest = checkpoints[-1]
    model.load_trainable_state_dict(read_tensors(latest / WEIGHTS_NAME), source=latest / WEIGHTS_NAME)
    tensors = read_tensors(latest / OPTIMIZER_NAME)
    restore_optimizer(model, optimizer, tensors)
    state = read_json_object(latest / TRAINER_STATE_NAME, ("epoch", "train_seconds", "history", "scheduler"))
    scheduler.load_state_dict(state["scheduler"])
    # the scheduler sets the learning rate when it steps; a restored one must also set it now
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    torch.set_rng_state(tensors["torch_rng_state"])
    print(f"resumed from {latest} (epoch {state['epoch']})")
    return state["epoch"], state["train_seconds"], state["history"]


def library_versions(model_name: str) -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "coda_adapters": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "model": model_name,
    }
