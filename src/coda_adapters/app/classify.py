"""Fine-tuning and evaluation of CoDA text classifiers, with checkpoints that survive a crash.

The loop is plain PyTorch driven by ``accelerate``, so the same code runs in one process or under
``accelerate launch`` (DDP; gloo on CPU, NCCL on GPUs): ``--batch-size`` is the global batch, split
across processes.
"""

from __future__ import annotations

import copy
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import WEIGHTS_NAME, read_adapter_weights, read_coda_config
from ..config import CodaConfig, check_choice, check_int, check_number, option
from ..files import read_json_object, write_json
from ..model import CodaModel, get_coda_model
from ..router_init import init_routers_from_attention
from ..version import __version__
from .data import ClassificationData, LabelledTexts, stratified_split
from .loop import (
    CHECKPOINTS,
    Optimization,
    OptimizerConfig,
    annealed_epsilon,
    best_epoch,
    epoch_order,
    restore_best_weights,
    resume_from_checkpoint,
    run_epoch,
    save_best_weights,
    save_checkpoint,
    warmed_up_reduction,
)
from .options import flag

TASK_NAME = "coda_task.json"
METRICS_NAME = "metrics.json"
ROUTER_INITS = ("random", "attention", "attention-text")  # TrainConfig.router_init
CALIBRATION_EXAMPLES = 64  # training examples the "attention" router initialisation is fitted on


@dataclass
class TrainConfig(OptimizerConfig):
    """Fine-tuning: ``epochs`` passes (more if that is under ``min_steps`` optimizer steps), evaluation on a
    ``val_size`` split and a checkpoint after each."""

    epochs: int = option(3, "passes over the training data (more on small data: see --min-steps)")
    min_steps: int = option(
        250, "optimizer steps at least: small data sets get more epochs (0 = exactly --epochs epochs)"
    )
    val_size: float = option(0.1, "share of the training data held out for validation (0 = none)")
    # A routed model can lose what it had learned in its last epoch (bbc-needle, README "A position prior
    # inside routing": validation 78% -> 57%); validation runs at the target r, so the best epoch is one to deploy
    keep_best: bool = option(
        False, "end with the weights of the epoch with the best validation accuracy (default: the last epoch's)"
    )
    # Routing that starts dense (README "Training", "Routing that earns its keep"): on bbc-needle, routing
    # from the first step does not find the evidence; the paper's behaviour is --dense-start 0 --reduction-warmup 0
    dense_start: float = option(
        1 / 3, "share of the steps, from the first, trained densely (every token) before routing"
    )
    reduction_warmup: float = option(
        1 / 3, "share of the steps, after --dense-start, over which the kept share of tokens falls from all to 1/r"
    )
    # A soft top-k that starts soft and sharpens while the budget shrinks (loop.annealed_epsilon); a fixed
    # softer ε lifted the ViT demo's r = 3 and cost bbc-needle's r = 5 (README)
    epsilon_start: float | None = option(
        None,
        "the soft top-k's epsilon when routing starts, lowered geometrically to the model's --epsilon over "
        "--reduction-warmup (None: the model's epsilon throughout)",
    )
    # ST-MoE's auxiliary loss for routers (coda_adapters.routing.router_z_loss); on bbc-needle at r = 5 it did
    # nothing at 1e-3 and lost the needle in 3 seeds of 5 at 0.1 (README "A router z-loss"), so it is off
    router_z_loss: float = option(
        0.0, "weight of the router z-loss added to the task loss (ST-MoE's is 1e-3; 0 = none)"
    )
    eval_batch_size: int = option(32, "examples per batch in evaluation")
    # Routers that start by scoring what the frozen model attends to (coda_adapters.router_init, the
    # importance signal of learned token pruning); on the ViT demo with digits anywhere (README) it lifted r = 3
    router_init: str = option(
        "random",
        "how learned routers start: random; attention (fitted to the attention each token receives in the "
        "frozen model, on the first 64 training examples); attention-text (the same fit over the text tokens "
        "only, not the tokenizer's special tokens, which take most of the attention)",
        choices=ROUTER_INITS,
    )
    # Distillation from a trained dense adapter, as DynamicViT trains its token pruning against the
    # unpruned model: the teacher's class distribution tells the routed model more than the label alone
    teacher: str | None = option(
        None, "a `coda train` output on the same model and labels whose predictions are also learned (None: none)"
    )
    distill_weight: float = option(
        0.5, "with --teacher: loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher || model)"
    )
    distill_temperature: float = option(2.0, "with --teacher: the temperature T of both distributions")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(flag("epochs"), self.epochs, low=1)
        check_int(flag("min_steps"), self.min_steps, low=0)
        check_int(flag("eval_batch_size"), self.eval_batch_size, low=1)
        check_choice(flag("router_init"), self.router_init, ROUTER_INITS)
        check_number(flag("val_size"), self.val_size, low=0, below=1)
        check_number(flag("router_z_loss"), self.router_z_loss, low=0)
        if self.keep_best and self.val_size == 0:
            raise ValueError(f"{flag('keep_best')} needs a validation split: set {flag('val_size')} above 0")
        check_number(flag("dense_start"), self.dense_start, low=0, high=1)
        check_number(flag("reduction_warmup"), self.reduction_warmup, low=0, high=1)
        check_number("--dense-start plus --reduction-warmup", self.dense_start + self.reduction_warmup, high=1)
        if self.epsilon_start is not None:
            check_number(flag("epsilon_start"), self.epsilon_start, above=0)
            if self.reduction_warmup == 0:
                raise ValueError(
                    f"{flag('epsilon_start')} anneals over the reduction warm-up: set {flag('reduction_warmup')} "
                    f"above 0, or leave {flag('epsilon_start')} unset"
                )
        check_number(flag("distill_weight"), self.distill_weight, low=0, high=1)
        check_number(flag("distill_temperature"), self.distill_temperature, above=0)


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
    for name, tensor in read_adapter_weights(weights_path).items():
        target = name if name in own else prefix + name
        if target not in own or own[target].shape != tensor.shape:
            raise ValueError(f"{weights_path}: {name} {tuple(tensor.shape)} has no counterpart in this model")
        tensors[target] = tensor
    with torch.no_grad():
        for name, parameter in model.model.named_parameters():
            if name in tensors:
                parameter.copy_(tensors[name])
    return config


def pretrained_start_notes(pretrained: CodaConfig, config: CodaConfig, router_lr_scale: float) -> list[str]:
    """What to tell a user who fine-tunes ``config`` from routers pretrained with ``pretrained`` (``coda train
    --init``): the routing settings that differ from the pretraining's (allowed: the routers still score tokens,
    but learned for another budget), and the default router rate, at which pretrained routers barely move in
    fine-tuning (cosine 0.98-0.99 to their start on bbc-needle: README, "Why pretrained routers cost r = 3")."""
    notes = [
        f"--init was pretrained with {flag(name)} {getattr(pretrained, name):g}, this model has "
        f"{getattr(config, name):g}: its routers learned another budget"
        for name in ("reduction", "keep_first")
        if getattr(pretrained, name) != getattr(config, name)
    ]
    if config.reduction > 1 and config.router == "learned" and router_lr_scale == 1.0:
        notes.append(
            "pretrained routers barely move at --router-lr-scale 1; 30 lets the task move them (README, 'Why "
            "pretrained routers cost r = 3')"
        )
    return notes


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


class Encoded:
    """Token ids of a list of texts (truncated to ``max_length``), padded per batch."""

    def __init__(self, tokenizer: Any, texts: list[str], labels: list[int] | None, max_length: int) -> None:
        check_max_length(tokenizer, max_length)
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.labels = labels
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> Encoded:
        """The examples ``indices``, in that order (no new tokenization)."""
        part = copy.copy(self)
        part.ids = [self.ids[i] for i in indices]
        part.labels = None if self.labels is None else [self.labels[i] for i in indices]
        return part

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


def check_max_length(tokenizer: Any, max_length: int) -> None:
    """Reject a ``max_length`` the tokenizer cannot honour: it silently ignores one that leaves no room
    for a text token beside its special tokens."""
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise ValueError(
            f"--max-length must be more than the {special} special tokens the tokenizer adds, got {max_length}"
        )


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
    logits, examples_per_second = predict_logits(model, encoded, batch_size)
    return logits.softmax(-1), examples_per_second


def predict_logits(model: nn.Module, encoded: Encoded, batch_size: int) -> tuple[torch.Tensor, float]:
    """Logits ``[examples, labels]`` (float32) in the input order, and the examples per second."""
    model.eval()
    logits: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for indices in length_sorted_batches(encoded, batch_size):
            batch = encoded.batch(indices)
            batch.pop("labels", None)
            for i, row in zip(indices, model(**batch).logits.float(), strict=True):
                logits[i] = row
    seconds = time.perf_counter() - start
    return torch.stack([logits[i] for i in range(len(encoded))]), len(encoded) / seconds


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


def format_confusion_matrix(names: list[str], matrix: list[list[int]]) -> str:
    """Rows: true label, columns: predicted, names cut to six characters."""
    width = max(len(n) for n in names)
    lines = ["confusion matrix (rows: true label, columns: predicted):"]
    lines.append(" " * (width + 1) + " ".join(f"{n[:6]:>6}" for n in names))
    lines += [f"{name:<{width}} " + " ".join(f"{v:>6}" for v in row) for name, row in zip(names, matrix, strict=True)]
    return "\n".join(lines)


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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # find_unused_parameters: with a [CLS]-pooled head the last layer's router gets no gradient
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"--batch-size {config.batch_size} must divide among {accelerator.num_processes} processes")
    torch.manual_seed(config.seed)
    train_part, val_part = split_validation(data.train, config)
    check_labels(train_part, len(data.label_names))
    encoded = Encoded(tokenizer, train_part.texts, train_part.labels, config.max_length)
    steps_per_epoch = len(epoch_batches(len(encoded), config, 0, min_size=accelerator.num_processes))
    epochs = planned_epochs(config, steps_per_epoch, show_note=accelerator.is_main_process)
    optimization = Optimization(model, config, steps_per_epoch * epochs)
    history: list[dict[str, Any]] = []
    start_epoch, train_seconds = 0, 0.0
    router_init_fit = None
    if config.router_init != "random":  # before resuming: a checkpoint then overwrites the fitted weights
        router_init_fit = fit_routers(model, tokenizer, encoded, text_only=config.router_init == "attention-text")
    if resume:
        state = resume_from_checkpoint(out_dir, model, optimization)
        start_epoch, train_seconds, history = state["epoch"], state["train_seconds"], state["history"]
    teacher = None
    if config.teacher is not None:
        teacher = teacher_logits(config, encoded, data.label_names, model_name, accelerator)
    wrapped = optimization.prepare(accelerator, model)
    target_reduction, total_steps = model.coda_config.reduction, steps_per_epoch * epochs
    target_epsilon = model.coda_config.epsilon

    def loss_of(indices: list[int]) -> torch.Tensor:
        step = optimization.steps_taken
        model.reduction = warmed_up_reduction(
            target_reduction, step, total_steps, config.reduction_warmup, config.dense_start
        )
        if config.epsilon_start is not None:
            model.epsilon = annealed_epsilon(
                config.epsilon_start, target_epsilon, step, total_steps, config.reduction_warmup, config.dense_start
            )
        batch = encoded.batch(indices)
        if teacher is not None:  # sharded with the batch, so each process gets its own examples' targets
            batch["teacher_logits"] = teacher[indices]
        batch = shard(batch, accelerator)
        targets = batch.pop("teacher_logits", None)
        output = wrapped(**batch)
        loss = output.loss
        if targets is not None:
            loss = distillation_loss(loss, output.logits, targets, config.distill_weight, config.distill_temperature)
        if config.router_z_loss:
            loss = loss + config.router_z_loss * model.router_z_loss()
        # DDP averages the processes' gradients of their own mean losses: weighted by each one's share of the
        # batch, that average is the global batch's mean also when the slices differ in size (a last batch)
        return loss * (len(batch["input_ids"]) * accelerator.num_processes / len(indices))

    for epoch in range(start_epoch, epochs):
        wrapped.train()
        result = run_epoch(
            epoch_batches(len(encoded), config, epoch, min_size=accelerator.num_processes),
            loss_of,
            optimization,
            desc=f"epoch {epoch + 1}/{epochs}",
            where=f"epoch {epoch + 1}",
            stop_hint=f"the last good checkpoint in {out_dir / CHECKPOINTS} is kept",
            show_progress=show_progress and accelerator.is_main_process,
        )
        model.reduction, model.epsilon = target_reduction, target_epsilon  # validated, saved and deployed at these
        train_seconds += result.seconds
        record = {"epoch": epoch + 1, "train_loss": result.loss, "epoch_seconds": result.seconds}
        if val_part is not None:
            val = evaluate(model, tokenizer, val_part, data.label_names, config.max_length, config.eval_batch_size)
            record.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"])
        history.append(record)
        if accelerator.is_main_process:
            if config.keep_best and best_epoch(history) is record:
                save_best_weights(out_dir, model)
            state = {"epoch": epoch + 1, "train_seconds": train_seconds, "history": history, "config": asdict(config)}
            save_checkpoint(out_dir, model, optimization, state)
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
        accelerator.wait_for_everyone()

    metrics = {}
    if accelerator.is_main_process:
        improving = still_improving(history)  # False without a validation split
        if improving:
            print(
                f"note: validation accuracy was still rising in the last epoch "
                f"({history[-2]['val_accuracy']:.4f} -> {history[-1]['val_accuracy']:.4f}); more epochs may help",
                file=sys.stderr,
            )
        kept = keep_best_epoch(out_dir, model, history) if config.keep_best else history[-1]
        run = {
            "epochs": epochs,
            "kept_epoch": kept["epoch"],
            "still_improving": improving,
            "train_seconds": train_seconds,
            "epoch_seconds": [r["epoch_seconds"] for r in history],
            "train_examples": len(train_part.texts),
            "validation_examples": 0 if val_part is None else len(val_part.texts),
            "history": history,
            "router_init_fit": router_init_fit,  # per routed layer, with --router-init attention
            "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
        }
        metrics = {**final_metrics(model, tokenizer, data, config, model_name), **run, **(extra_metrics or {})}
        model.save_pretrained(out_dir)
        save_task(out_dir, model_name, data.label_names, config.max_length)
        write_json(out_dir / METRICS_NAME, metrics)
    accelerator.wait_for_everyone()
    return metrics


def check_router_start(init: str | Path | None, router_init: str) -> None:
    """Refuse two starts for the routers: ``--router-init`` fits them when training starts, after ``--init``
    loaded the pretrained ones, so the fit would silently replace them."""
    if init is not None and router_init != "random":
        raise ValueError(
            f"--router-init {router_init} fits the routers when training starts and would replace the routers "
            f"that --init {init} loaded: use one of the two"
        )


def fit_routers(model: CodaModel, tokenizer: Any, encoded: Encoded, text_only: bool = False) -> dict[str, float]:
    """Fit the learned routers to the frozen model's attention (``init_routers_from_attention``) on the first
    ``CALIBRATION_EXAMPLES`` training examples, over every real token or (``text_only``) over all but the
    tokenizer's special tokens; returns the fit per routed layer (``router_init_fit`` in metrics.json)."""
    calibration = encoded.batch(list(range(min(CALIBRATION_EXAMPLES, len(encoded)))))
    calibration.pop("labels", None)
    tokens = ~special_token_mask(calibration["input_ids"], tokenizer) if text_only else None
    fits = init_routers_from_attention(model, calibration, tokens=tokens)
    return {str(index): fit for index, fit in fits.items()}


def special_token_mask(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """bool ``[batch, n]``: the tokenizer's special tokens (``[CLS]``, ``[SEP]``, padding)."""
    return torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))


def keep_best_epoch(out_dir: Path, model: CodaModel, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Load the best validation epoch's weights (``--keep-best``) into ``model`` unless they are the last
    epoch's; returns that epoch's record."""
    best = best_epoch(history)
    if best is not history[-1]:
        restore_best_weights(out_dir, model)
        print(
            f"note: --keep-best: the weights of epoch {best['epoch']} (validation accuracy {best['val_accuracy']:.4f}; "
            f"the last epoch {history[-1]['val_accuracy']:.4f})",
            file=sys.stderr,
        )
    return best


def teacher_logits(
    config: TrainConfig, encoded: Encoded, label_names: list[str], model_name: str, accelerator: Any = None
) -> torch.Tensor:
    """The ``--teacher`` classifier's logits ``[train examples, labels]`` on the training texts, computed once
    before training (the teacher is frozen, and its dense forward would otherwise cost every step as much).
    Under DDP (an ``accelerator`` of several processes) the processes share that work."""
    task = read_task(config.teacher)
    if task["label_names"] != label_names:
        raise ValueError(
            f"--teacher {config.teacher}: its labels {task['label_names']} differ from the data's {label_names}"
        )
    if task["model"] != model_name:
        raise ValueError(
            f"--teacher {config.teacher}: trained on {task['model']}, not {model_name} (both must read the same tokens)"
        )
    model, _, _ = load_classifier(config.teacher)
    print(f"teacher {config.teacher}: predicting the {len(encoded)} training texts")
    if accelerator is None or accelerator.num_processes == 1:
        return predict_logits(model, encoded, config.eval_batch_size)[0]
    return logits_by_rank(model, encoded, config.eval_batch_size, accelerator)


def logits_by_rank(model: nn.Module, encoded: Encoded, batch_size: int, accelerator: Any) -> torch.Tensor:
    """Logits ``[examples, labels]`` in the input order, each of the ``W`` processes predicting examples
    ``rank, rank + W, ...`` and all of them gathering the parts (every process needs every example's logits,
    since its shard of later batches may hold any of them).

    The gather needs one shape on every process, so each part is padded to ``ceil(examples / W)`` rows;
    interleaving the parts row by row puts example ``j * W + rank`` at its place and the padding last.
    """
    world, total = accelerator.num_processes, len(encoded)
    mine = predict_logits(model, encoded.subset(list(range(accelerator.process_index, total, world))), batch_size)[0]
    rows = -(-total // world)
    padded = torch.cat([mine, mine.new_zeros(rows - len(mine), mine.shape[1])])
    gathered = accelerator.gather(padded).view(world, rows, -1)  # [process, row, labels]
    return gathered.transpose(0, 1).reshape(world * rows, -1)[:total]


def distillation_loss(
    cross_entropy: torch.Tensor, logits: torch.Tensor, teacher: torch.Tensor, weight: float, temperature: float
) -> torch.Tensor:
    """``(1 - weight) * cross_entropy + weight * T^2 * KL(teacher_T || model_T)``, the distributions softened
    by the temperature ``T``; logits ``[batch, labels]``. ``T^2`` keeps the soft term's gradient on the scale
    of the hard one's as ``T`` changes (Hinton et al. 2015)."""
    log_model = torch.log_softmax(logits.float() / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_model, log_teacher, log_target=True, reduction="batchmean")
    return (1 - weight) * cross_entropy + weight * temperature**2 * kl


def planned_epochs(config: TrainConfig, steps_per_epoch: int, show_note: bool = True) -> int:
    """``config.epochs``, or more if that many epochs make fewer than ``config.min_steps`` optimizer steps.

    The usual recipe (3 epochs) is a few hundred steps on thousands of documents, but only a few dozen
    on a few hundred, where the adapters and routers are still far from trained when it stops.
    """
    epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
    if epochs > config.epochs and show_note:
        print(
            f"note: {steps_per_epoch} steps per epoch; training {epochs} epochs instead of {config.epochs} to make "
            f"--min-steps {config.min_steps} (--min-steps 0 turns this off)",
            file=sys.stderr,
        )
    return epochs


def still_improving(history: list[dict[str, Any]]) -> bool:
    """Whether validation accuracy rose in the last epoch (a sign that training stopped early)."""
    accuracies = [record["val_accuracy"] for record in history if "val_accuracy" in record]
    return len(accuracies) >= 2 and accuracies[-1] > accuracies[-2]


def final_metrics(
    model: CodaModel, tokenizer: Any, data: ClassificationData, config: TrainConfig, model_name: str
) -> dict[str, Any]:
    """The test split's metrics and the settings of the run, for ``metrics.json``."""
    test = evaluate(model, tokenizer, data.test, data.label_names, config.max_length, config.eval_batch_size)
    return {
        **test,
        "reduction": model.coda_config.reduction,
        "data": data.source,
        "label_names": data.label_names,
        "train_config": asdict(config),
        "coda_config": model.coda_config.to_dict(),
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
        "versions": library_versions(model_name),
    }


def shard(batch: dict[str, torch.Tensor], accelerator: Any) -> dict[str, torch.Tensor]:
    """This process's slice of a global batch, on its device (DDP then averages the gradients). The slices'
    sizes differ by at most one, so every process gets an example when the batch has one per process."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        size = batch["input_ids"].shape[0]
        start, stop = rank * size // world, (rank + 1) * size // world
        batch = {key: value[start:stop] for key, value in batch.items()}
    return {key: value.to(accelerator.device) for key, value in batch.items()}


def split_validation(train: LabelledTexts, config: TrainConfig) -> tuple[LabelledTexts, LabelledTexts | None]:
    if config.val_size == 0:
        return train, None
    return stratified_split(train, config.val_size, config.seed, what="--val-size")


def check_labels(data: LabelledTexts, num_labels: int) -> None:
    for i, label in enumerate(data.labels):
        if not 0 <= label < num_labels:
            raise ValueError(f"training example {i} has label {label}, outside 0..{num_labels - 1}")


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
