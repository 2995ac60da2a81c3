"""The one training loop every job uses: AdamW over the trainable parameters, linear warm-up then
linear decay, gradient clipping, a stop on a non-finite loss, and checkpoints that survive a crash.

A job supplies its batches and a function that turns a batch into a loss; :func:`run_epoch` does the
rest. ``coda train`` runs it once per epoch (under ``accelerate`` for DDP), ``coda pretrain`` and the
prefill pretraining once over a fixed number of steps, the vision demo once per epoch.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import WEIGHTS_NAME, read_adapter_weights
from ..config import check_int, check_number, option
from ..files import read_json_object, read_tensors, write_json, write_tensors
from ..model import CodaModel
from .options import flag
from .progress import progress_bar

CHECKPOINTS = "checkpoints"
BEST = "best"  # checkpoints/best: the best validation epoch's weights (--keep-best)
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); the last good checkpoint is kept."""


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and decay and gradient clipping, on batches of texts cut to ``max_length``."""

    batch_size: int = option(16, "examples per optimizer step (the global batch, split across processes)")
    lr: float = option(1e-3, "peak learning rate of AdamW")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "share of the steps spent warming the learning rate up from 0")
    max_grad_norm: float = option(1.0, "gradients are clipped to this global norm")
    max_length: int = option(256, "texts are cut to this many tokens (special tokens included)")
    seed: int = option(0, "seed of the initial weights, the data order and the validation split")
    router_lr_scale: float = option(1.0, "the routers' learning rate is --lr times this")

    def __post_init__(self) -> None:
        check_int(flag("batch_size"), self.batch_size, low=1)
        # a tokenizer silently ignores max_length < 2 (BERT's [CLS] and [SEP] alone take two tokens)
        check_int(flag("max_length"), self.max_length, low=2)
        check_number(flag("lr"), self.lr, above=0)
        check_number(flag("max_grad_norm"), self.max_grad_norm, above=0)
        check_number(flag("weight_decay"), self.weight_decay, low=0, below=1)
        check_number(flag("warmup_ratio"), self.warmup_ratio, low=0, below=1)
        check_int(flag("seed"), self.seed, low=0)
        check_number(flag("router_lr_scale"), self.router_lr_scale, above=0)


class Optimization:
    """AdamW over the trainable parameters of ``model`` with a linear warm-up over ``warmup_ratio`` of
    ``total_steps``, then a linear decay to zero, and gradient clipping; :meth:`step` applies one loss.

    The routers learn at ``router_lr_scale`` times the rate of the rest: a router is one vector whose
    scale sets how sharply the soft top-k separates tokens, and it may need to move faster than the
    adapters it routes for.
    """

    def __init__(self, model: nn.Module, config: OptimizerConfig, total_steps: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        routers, others = trainable_parameters(model)
        self.parameters = routers + others
        if not self.parameters:
            raise ValueError("nothing to train: the model has no parameter that requires a gradient")
        self.max_grad_norm = config.max_grad_norm
        groups = [{"params": others}, {"params": routers, "lr": config.lr * config.router_lr_scale}]
        groups = [group for group in groups if group["params"]]
        self.optimizer: Any = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        warmup = round(config.warmup_ratio * total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, total_steps)
        self.accelerator: Any = None

    @property
    def steps_taken(self) -> int:
        return self.scheduler.last_epoch

    def prepare(self, accelerator: Any, model: nn.Module) -> nn.Module:
        """Hand the model and optimizer to ``accelerate`` (DDP across processes); returns the wrapped model."""
        self.accelerator = accelerator
        wrapped, self.optimizer = accelerator.prepare(model, self.optimizer)
        return wrapped

    def step(self, loss: torch.Tensor) -> None:
        """Backward, clip, AdamW step, schedule step, zero the gradients."""
        if self.accelerator is not None:
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- state, for checkpoints ---------------------------------------------------------------------

    def state_tensors(self, model: CodaModel) -> dict[str, torch.Tensor]:
        """AdamW's moments by parameter name, as plain tensors (safetensors, no pickle)."""
        names = {id(p): name for name, p in model.model.named_parameters()}
        tensors = {}
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                for key, value in self.optimizer.state.get(parameter, {}).items():
                    tensors[f"{names[id(parameter)]}::{key}"] = torch.as_tensor(value).detach().clone().cpu()
        return tensors

    def load_state(self, model: CodaModel, tensors: dict[str, torch.Tensor], scheduler_state: dict) -> None:
        """Restore AdamW's moments and the schedule, and the learning rate the schedule had reached."""
        parameters = dict(model.model.named_parameters())
        for key, value in tensors.items():
            name, _, state_field = key.partition("::")
            if name not in parameters:
                raise ValueError(f"checkpoint optimizer state names {name!r}, which this model does not have")
            self.optimizer.state[parameters[name]][state_field] = value.clone()
        self.scheduler.load_state_dict(scheduler_state)
        # the scheduler sets the learning rate when it steps; a restored one must also set it now
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


def trainable_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(routers' weights, every other parameter that requires a gradient)`` of ``model``."""
    from ..routing import Router

    routers = [p for m in model.modules() if isinstance(m, Router) for p in m.parameters() if p.requires_grad]
    router_ids = {id(p) for p in routers}
    return routers, [p for p in model.parameters() if p.requires_grad and id(p) not in router_ids]


@dataclass
class EpochResult:
    """What one pass of :func:`run_epoch` measured: the mean loss per example, each step's loss, seconds."""

    loss: float
    step_losses: list[float]
    seconds: float


def run_epoch(
    batches: Iterable[Any],
    loss_of: Callable[[Any], torch.Tensor],
    optimization: Optimization,
    *,
    desc: str,
    where: str | None = None,
    stop_hint: str = "nothing was saved",
    size_of: Callable[[Any], int] = len,
    total: int | None = None,
    show_progress: bool = True,
) -> EpochResult:
    """One optimizer step per batch: ``loss_of(batch)`` then :meth:`Optimization.step`.

    A non-finite loss raises :class:`TrainingError` before the step (so the weights stay finite),
    naming ``where`` it happened and ``stop_hint`` (what was kept). The mean loss weighs each batch by
    ``size_of(batch)`` examples.
    """
    seen, loss_sum, step_losses = 0, 0.0, []
    start = time.perf_counter()
    bar = progress_bar(batches, desc=desc, unit="batch", total=total, enabled=show_progress)
    for batch in bar:
        loss = loss_of(batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at {where or desc}; stopped, {stop_hint}")
        optimization.step(loss)
        size = size_of(batch)
        step_losses.append(loss.item())
        seen, loss_sum = seen + size, loss_sum + step_losses[-1] * size
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", ex_per_s=f"{rate:.1f}", refresh=False)  # the bar redraws itself
    bar.close()
    return EpochResult(loss_sum / max(seen, 1), step_losses, time.perf_counter() - start)


def warmed_up_reduction(
    target: float, step: int, total_steps: int, warmup_ratio: float, dense_ratio: float = 0.0
) -> float:
    """The reduction to train step ``step`` at: every token (r = 1) for the first ``dense_ratio`` of
    ``total_steps``, then a share of tokens kept, ``1/r``, that falls linearly from 1 to ``1/target`` over the
    next ``warmup_ratio`` of them, then ``target``.

    Routing from the first step asks routers and adapters to learn together from nothing; starting dense
    lets the adapters find the task while the routers learn which tokens can go, as the budget shrinks
    (EViT's keep-rate schedule: keep everything for the first epochs, then lower the keep rate).
    """
    progress = warmup_progress(step, total_steps, warmup_ratio, dense_ratio)
    if progress == 1.0:
        return target
    return 1.0 / (1.0 - progress * (1.0 - 1.0 / target))


def annealed_epsilon(
    start: float, target: float, step: int, total_steps: int, warmup_ratio: float, dense_ratio: float = 0.0
) -> float:
    """The soft top-k's ε at step ``step``: ``start`` until routing starts, then falling geometrically to
    ``target`` over the reduction warm-up (:func:`warmed_up_reduction`'s), then ``target``.

    A larger ε spreads the soft top-k's weight over more tokens, so while the budget shrinks every token
    still gets some gradient and the routers can find what they would miss; annealing ends at the ε the
    model is saved and deployed with (a schedule from the temperature annealing of Gumbel-softmax routers).
    """
    progress = warmup_progress(step, total_steps, warmup_ratio, dense_ratio)
    return target if progress == 1.0 else start * (target / start) ** progress


def warmup_progress(step: int, total_steps: int, warmup_ratio: float, dense_ratio: float = 0.0) -> float:
    """How far ``step`` is through the routing warm-up: 0 during the first ``dense_ratio`` of ``total_steps``,
    then rising linearly to 1 over the next ``warmup_ratio`` of them, then 1."""
    dense_steps, warmup_steps = dense_ratio * total_steps, warmup_ratio * total_steps
    if step < dense_steps:
        return 0.0
    if step >= dense_steps + warmup_steps:
        return 1.0
    return (step - dense_steps) / warmup_steps


# --------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of the seed and the epoch only (for --resume)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def batches_for_steps(size: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of indices into ``size`` examples, passing over them epoch after epoch (for jobs
    counted in steps rather than epochs, such as CoDA pretraining)."""
    order: list[int] = []
    epoch = 0
    for _ in range(steps):
        if len(order) < batch_size:
            order += epoch_order(size, seed, epoch)
            epoch += 1
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save_checkpoint(out_dir: Path, model: CodaModel, optimization: Optimization, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/epoch-N`` (atomically: a crash leaves the previous checkpoint or the new one),
    then drop older ones."""

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tensors = optimization.state_tensors(model)
        tensors["torch_rng_state"] = torch.get_rng_state()
        write_tensors(directory / OPTIMIZER_NAME, tensors)
        write_json(directory / TRAINER_STATE_NAME, {**state, "scheduler": optimization.scheduler.state_dict()})

    final = out_dir / CHECKPOINTS / f"epoch-{state['epoch']}"
    _replace_directory(final, write)
    for older in completed_checkpoints(out_dir)[:-1]:
        shutil.rmtree(older, ignore_errors=True)
    return final


def save_best_weights(out_dir: Path, model: CodaModel) -> None:
    """Write the trainable weights to ``checkpoints/best`` (replacing the last best; atomic like an epoch's
    checkpoint), for ``--keep-best`` to restore at the end, also after a ``--resume``."""
    _replace_directory(out_dir / CHECKPOINTS / BEST, model.save_pretrained)


def restore_best_weights(out_dir: Path, model: CodaModel) -> None:
    """Load the weights :func:`save_best_weights` wrote into ``model``."""
    path = out_dir / CHECKPOINTS / BEST / WEIGHTS_NAME
    model.load_trainable_state_dict(read_adapter_weights(path), source=path)


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of the first epoch with the highest validation accuracy."""
    return max(history, key=lambda record: record["val_accuracy"])


def _replace_directory(final: Path, write: Callable[[Path], None]) -> None:
    """Fill ``final`` through ``write(temporary)`` and a rename at the end: every file is flushed and fsynced
    before the rename, so a crash leaves either the previous directory or the new one, never half of one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    write(temporary)
    _fsync_directory(temporary)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    _fsync_directory(final.parent)


def completed_checkpoints(out_dir: Path) -> list[Path]:
    """The complete ``checkpoints/epoch-N`` directories, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("epoch-*") if (p / TRAINER_STATE_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def resume_from_checkpoint(out_dir: Path, model: CodaModel, optimization: Optimization) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and random state from the newest complete checkpoint;
    returns its ``trainer_state.json`` (``epoch``, ``train_seconds``, ``history``, ...)."""
    checkpoints = completed_checkpoints(out_dir)
    if not checkpoints:
        raise ValueError(f"--resume: no complete checkpoint in {out_dir / CHECKPOINTS}")
    latest = checkpoints[-1]
    model.load_trainable_state_dict(read_adapter_weights(latest / WEIGHTS_NAME), source=latest / WEIGHTS_NAME)
    tensors = read_tensors(latest / OPTIMIZER_NAME)
    rng_state = tensors.pop("torch_rng_state")
    state = read_json_object(latest / TRAINER_STATE_NAME, ("epoch", "train_seconds", "history", "scheduler"))
    optimization.load_state(model, tensors, state["scheduler"])
    torch.set_rng_state(rng_state)
    print(f"resumed from {latest} (epoch {state['epoch']})")
    return state


def _fsync_directory(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
