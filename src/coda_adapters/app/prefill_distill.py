"""What a decoder LM predicts after a routed prefill, and the CoDA pretraining that makes it predict what
the dense prefill does (used by the SmolLM2 demo, :mod:`.prefill`, and the pass-key probe, :mod:`.passkey`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import CodaModel
from .loop import Optimization, OptimizerConfig, run_epoch, warmed_up_reduction


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
) -> list[float]:
    """CoDA pretraining for prefill: routers and adapters learn to make the routed prefill predict what the
    dense one does, minimising ``KL(dense || routed)`` at the prompt's next token and over the continuation
    decoded with the routed prefill's cache. ``windows`` ``[count, prompt_tokens + m]`` must not overlap the
    text the quality is measured on. With ``reduction_warmup``, the routed prefill keeps every token at
    first and reaches ``r`` after that share of the steps (:func:`~.loop.warmed_up_reduction`). Returns
    the loss of every step."""
    config = OptimizerConfig(batch_size=batch_size, lr=lr, weight_decay=0.0, max_length=windows.shape[1])
    optimization = Optimization(coda, config, steps)
    generator = torch.Generator().manual_seed(0)
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
