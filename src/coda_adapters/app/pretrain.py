"""CoDA pretraining (method §4): adapt routers and adapters to sparse routing on unlabelled text.

Objectives (``--objective``):
- ``layerwise`` (default): every routed layer reproduces what its frozen layer computes densely on the same
  input. Use it with ``routers_only`` (the default): when the adapters learn too, each layer's input is the layer
  below's output, free to drift, and it drifts to where the targets are easy to match, every text onto nearly
  one point (README, "CoDA pretraining on bbc-needle"; ``examples/pretrained_spread.py`` measures it).
- ``distill``: the routed model reproduces the frozen dense model's final hidden states (mean squared error
  over real tokens). The teacher is the same frozen weights run densely.
- ``pooled``: the mean-pooled sentence embedding matches the dense one (cosine distance).
- ``mlm``: the backbone's own masked-language-model objective, where the checkpoint has an MLM head.

With ``routers_only`` only the routers learn; the adapters keep their zero-initialised output. With
``reduction_warmup`` the share of tokens the routed layers keep falls linearly from all (just below, so that the
first step routes) to 1/r over that share of the steps.

The defaults (layer-wise targets, routers only, half the steps of warm-up, 100 steps) are the settings measured
best on bbc-needle over 3 seeds; fine-tune the pretrained routers at 30x the learning rate (``coda train --init
OUT --router-lr-scale 30``): at the default rate they barely move (README, "Why pretrained routers cost r = 3").

Which of these helps task accuracy is measured in the README ("CoDA pretraining: what was tried" and the
section after it); all are kept so that the measurements can be repeated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import CodaConfig, check_choice, check_int, check_number, option
from ..files import write_json
from ..model import CodaModel, get_coda_model
from ..pooling import weighted_mean
from .classify import Encoded, library_versions
from .loop import EpochResult, Optimization, OptimizerConfig, batches_for_steps, run_epoch, warmed_up_reduction
from .options import flag

OBJECTIVES = ("distill", "layerwise", "pooled", "mlm")
PRETRAIN_METRICS_NAME = "pretrain_metrics.json"


@dataclass
class PretrainConfig(OptimizerConfig):
    """CoDA pretraining: ``steps`` optimizer steps of ``objective`` on unlabelled text."""

    objective: str = option(
        "layerwise",
        "what the routed model learns: each dense layer's output (layerwise; keep --routers-only with it: with the "
        "adapters it collapses the texts), the dense final hidden states (distill), the dense mean-pooled "
        "embedding (pooled), or masked-LM (mlm)",
        choices=OBJECTIVES,
    )
    steps: int = option(100, "optimizer steps")
    mask_probability: float = option(0.15, "share of tokens masked for --objective mlm")
    routers_only: bool = option(
        True, "train only the routers, the adapters keep their zero output (--no-routers-only: the adapters too)"
    )
    reduction_warmup: float = option(
        0.5,
        "share of the steps over which the kept share of tokens falls from all to 1/r (0: at r from the first step)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(flag("objective"), self.objective, OBJECTIVES)
        check_int(flag("steps"), self.steps, low=1)
        check_number(flag("mask_probability"), self.mask_probability, above=0, below=1)
        check_number(flag("reduction_warmup"), self.reduction_warmup, low=0, high=1)


def build_pretraining_model(model: str, coda_config: CodaConfig, objective: str) -> tuple[CodaModel, Any]:
    """The bare backbone (or, for ``mlm``, the masked-LM model) wrapped as a CoDA model, and its tokenizer."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from .assets import resolve_model_path

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if objective == "mlm":
        base, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
        head_missing = [key for key in info["missing_keys"] if not key.startswith(base.base_model_prefix + ".")]
        if head_missing:
            raise ValueError(
                f"--objective mlm needs a masked-LM head, but the checkpoint {model!r} has none (missing "
                f"{head_missing[:3]}); use --objective distill"
            )
    else:
        base = AutoModel.from_pretrained(path)
    config = CodaConfig(**{**coda_config.to_dict(), "modules_to_save": []})  # no task head here
    return get_coda_model(base, config), tokenizer


def pretraining_loss(
    model: CodaModel, batch: dict[str, torch.Tensor], config: PretrainConfig, tokenizer: Any
) -> torch.Tensor:
    valid = batch["attention_mask"].bool()
    if config.objective == "mlm":
        return masked_lm_loss(model, batch, config.mask_probability, tokenizer)
    if config.objective == "layerwise":
        model.routing_state.record_dense_targets = True
        try:
            model(**batch)
        finally:
            model.routing_state.record_dense_targets = False
        layers = model.routing_state.dense_targets.values()
        return torch.stack([F.mse_loss(output[valid], dense[valid]) for output, dense in layers]).mean()
    with torch.no_grad(), model.disable_adapters():
        teacher = model(**batch).last_hidden_state
    student = model(**batch).last_hidden_state
    if config.objective == "distill":
        return F.mse_loss(student[valid], teacher[valid])
    pooled_student, pooled_teacher = weighted_mean(student, valid), weighted_mean(teacher, valid)
    return (1 - F.cosine_similarity(pooled_student, pooled_teacher, dim=-1)).mean()


def masked_lm_loss(
    model: CodaModel, batch: dict[str, torch.Tensor], probability: float, tokenizer: Any
) -> torch.Tensor:
    """BERT-style masking: ``probability`` of the real, non-special tokens become [MASK] and are predicted."""
    input_ids = batch["input_ids"].clone()
    special = torch.tensor(
        [tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in input_ids.tolist()],
        dtype=torch.bool,
    )
    candidates = batch["attention_mask"].bool() & ~special
    chosen = candidates & (torch.rand(input_ids.shape) < probability)
    labels = torch.where(chosen, input_ids, -100)
    input_ids[chosen] = tokenizer.mask_token_id
    return model(input_ids=input_ids, attention_mask=batch["attention_mask"], labels=labels).loss


def pretrain(
    model: CodaModel,
    tokenizer: Any,
    texts: list[str],
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    model_name: str,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train routers and adapters for ``config.steps`` steps on ``texts`` and save them in ``out_dir``.

    The model leaves at its own reduction with its own trainable parameters, also when pretraining stops midway
    (the warm-up changes the one, ``routers_only`` the other)."""
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    encoded = Encoded(tokenizer, texts, None, config.max_length)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    target_reduction = model.coda_config.reduction
    try:
        result = _pretraining_steps(model, tokenizer, encoded, config, show_progress)
        metrics = {
            "objective": config.objective,
            "first_loss": result.step_losses[0],
            "final_loss": sum(result.step_losses[-20:]) / len(result.step_losses[-20:]),
            "pretrain_seconds": result.seconds,
            "documents": len(texts),
            "pretrain_config": asdict(config),
            "coda_config": model.coda_config.to_dict(),
            "versions": library_versions(model_name),
        }
        model.save_pretrained(out_dir)  # the trainable weights: with routers_only, the routers alone
        write_json(out_dir / PRETRAIN_METRICS_NAME, metrics)
    finally:
        model.reduction = target_reduction
        for parameter in trainable:
            parameter.requires_grad_(True)
    return metrics


def _pretraining_steps(
    model: CodaModel, tokenizer: Any, encoded: Encoded, config: PretrainConfig, show_progress: bool
) -> EpochResult:
    """The optimizer steps of :func:`pretrain`, which leaves the model's reduction and trainable flags changed."""
    if config.routers_only:  # the adapters stay at their initial zero output; fine-tuning trains them
        for name, parameter in model.named_parameters():
            if ".router." not in name:
                parameter.requires_grad_(False)
    optimization = Optimization(model, config, config.steps)
    target_reduction = model.coda_config.reduction

    def loss_of(indices: list[int]) -> torch.Tensor:
        # the reduction warm-up that lets a decoder's pretraining work (README, "SmolLM2 prefill"), one step
        # ahead: at r = 1 every layer is its frozen self plus a zero-initialised adapter, nothing left to learn
        model.reduction = warmed_up_reduction(
            target_reduction, optimization.steps_taken + 1, config.steps, config.reduction_warmup
        )
        return pretraining_loss(model, encoded.batch(indices), config, tokenizer)

    model.train()
    return run_epoch(
        batches_for_steps(len(encoded), config.batch_size, config.steps, config.seed),
        loss_of,
        optimization,
        desc=f"pretrain ({config.objective})",
        total=config.steps,
        show_progress=show_progress,
    )
