"""What a decoder LM predicts after a routed prefill, and the CoDA pretraining that makes it predict what
the dense prefill does (used by the SmolLM2 demo, :mod:`.prefill`, and the pass-key probe, :mod:`.passkey`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import CodaConfig, check_int, check_number, option, require
from ..model import CodaModel, get_coda_model
from .loop import Optimization, OptimizerConfig, run_epoch, warmed_up_reduction


@dataclass
class PrefillRouting:
    """How a decoder LM's prompt is routed: which tokens every routed layer keeps, and whether the layers share one
    selection. The defaults are the decoder recipe (README, "SmolLM2"); ``keep_first=0, window_share=0,
    share_selection=False`` is the paper's routing, one router per layer over every token.

    A pretrained decoder cannot use a token in a layer when the layers below skipped it (its keys and values
    come from hidden states those layers never updated), and it predicts from its attention sink (the first
    tokens) and the tokens just before the prediction: so the window and the sink are kept, and the layers
    share the router's choice of the rest.
    """

    keep_first: int = option(4, "prompt tokens always routed at the start (the attention sink, or instructions)")
    window_share: float = option(
        0.75, "share of each prompt's budget ceil(n/r) kept as a local window of its last tokens (0 = none)"
    )
    share_selection: bool = option(True, "every routed layer runs the tokens the first one selects")

    def __post_init__(self) -> None:
        check_int("keep_first", self.keep_first, low=0)
        check_number("window_share", self.window_share, low=0, high=1)
        require(isinstance(self.share_selection, bool), "share_selection", "True or False", self.share_selection)

    def config(self, prompt_tokens: int, reduction: float) -> CodaConfig:
        """The CoDA settings for prompts of ``prompt_tokens`` tokens at reduction ``r``."""
        return CodaConfig(reduction=reduction, **self.fields(prompt_tokens, reduction))

    def fields(self, prompt_tokens: int, reduction: float) -> dict[str, Any]:
        """The :class:`CodaConfig` fields besides ``reduction`` (the window is a share of ``ceil(n / r)``)."""
        window = math.floor(self.window_share * math.ceil(prompt_tokens / reduction))
        return dict(keep_first=self.keep_first, keep_last=window, share_selection=self.share_selection)


def routed_copy(
    model: nn.Module, routing: PrefillRouting, prompt_tokens: int, reduction: float, seed: int, router: str = "learned"
) -> CodaModel:
    """A CoDA model around a copy of the decoder ``model`` (left untouched), routed as ``routing`` says at
    reduction ``r``; ``seed`` sets the routers' initial weights (``router="random"``: the compute-matched
    baseline that picks the router's share of the tokens at random, the kept ends alike)."""
    torch.manual_seed(seed)
    return get_coda_model(copy.deepcopy(model), replace(routing.config(prompt_tokens, reduction), router=router))


def routed_method(reduction: float, router: str) -> str:
    """A routed prefill's row name in the reports: ``coda r=3``, ``coda r=3, random router``."""
    return f"coda r={reduction:g}" + (", random router" if router == "random" else "")


def prefill_log_probs(
    model: nn.Module, prompt: torch.Tensor, continuation: torch.Tensor, *, grad: bool = False
) -> torch.Tensor:
    """Log-probabilities ``[batch, m + 1, vocab]`` of the token after ``prompt`` ``[batch, n]`` and after each
    of the ``m`` tokens of ``continuation`` ``[batch, m]``, fed one call after the prefill with its KV cache."""
    with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
        prefill = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        rest = model(input_ids=continuation, past_key_values=prefill.past_key_values, use_cache=True)
    return torch.cat([prefill.logits, rest.logits], dim=1).float().log_softmax(-1)


def distill_prefill(
    coda: CodaModel,
    windows: torch.Tensor,
    prompt_tokens: int,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 2,
    reduction_warmup: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """CoDA pretraining for prefill: routers and adapters learn to make the routed prefill predict what the
    dense one does, minimising ``KL(dense || routed)`` at the prompt's next token and over the continuation
    decoded with the routed prefill's cache. ``windows`` ``[count, prompt_tokens + m]`` must not overlap the
    text the quality is measured on. With ``reduction_warmup``, the routed prefill keeps every token at
    first and reaches ``r`` after that share of the steps (:func:`~.loop.warmed_up_reduction`). ``seed`` sets
    the order of the windows. Returns the loss of every step."""
    config = OptimizerConfig(batch_size=batch_size, lr=lr, weight_decay=0.0, max_length=windows.shape[1])
    optimization = Optimization(coda, config, steps)
    generator = torch.Generator().manual_seed(seed)
    batches = (torch.randperm(len(windows), generator=generator)[:batch_size] for _ in range(steps))
    target = coda.reduction

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        coda.reduction = warmed_up_reduction(target, optimization.steps_taken, steps, reduction_warmup)
        prompt, rest = windows[rows, :prompt_tokens], windows[rows, prompt_tokens:]
        with coda.disable_adapters():
            teacher = prefill_log_probs(coda, prompt, rest)
        student = prefill_log_probs(coda, prompt, rest, grad=True)
        return (teacher.exp() * (teacher - student)).sum(-1).mean()

    coda.train()
    result = run_epoch(batches, loss_of, optimization, desc="prefill pretraining", total=steps)
    coda.reduction = target
    coda.eval()
    return result.step_losses
