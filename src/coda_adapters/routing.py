"""Routing: the soft top-k that weights the routed tokens, and the router that picks them.

A CoDA layer runs its frozen pretrained layer on only ``k`` of the ``n`` tokens. The router gives every
token a score ``s = x @ w``; the ``k`` highest-scoring tokens are selected (hard top-k), and the soft
top-k weights ``λ`` scale what the frozen layer adds to them, so that the router gets a gradient.

``λ`` solves an entropy-regularised linear programme (Lei et al. 2023, §3.2)::

    λ = argmax  <s, λ> + ε H(λ),   H(λ) = -Σ λ_i log λ_i,   Σ λ_i = k,   0 <= λ_i <= 1

Its solution is ``λ_i = min(1, exp((s_i - τ) / ε))`` for one threshold ``τ`` per row, which
:func:`soft_topk` finds exactly with a sort and a cumulative log-sum-exp. The paper's iterative dual
solver is kept as ``method="coordinate_descent"`` for reproducing it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

SOFT_TOPK_METHODS = ("exact", "coordinate_descent")


# --------------------------------------------------------------------------------------------------
# Soft top-k
# --------------------------------------------------------------------------------------------------


def soft_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    epsilon: float = 0.1,
    method: str = "exact",
    iters: int = 20,
    epsilon_init: float = 4.0,
    epsilon_decay: float = 0.7,
) -> torch.Tensor:
    """Differentiable top-k weights: the entropy-regularised LP solution ``λ``, shape ``[batch, n]``.

    Args:
        scores: router scores ``[batch, n]`` (any float dtype; the computation runs in float32 or
            float64, whichever is wider than the input).
        k: how many tokens each row keeps: an int, or a LongTensor ``[batch]`` for a per-row ``k``.
            ``0 <= k <= n_valid`` in every row.
        mask: bool ``[batch, n]``, True for tokens that may be chosen. Masked positions get
            ``λ = 0`` exactly and take no share of ``k``.
        epsilon: entropy weight ``ε > 0``; as ``ε → 0``, ``λ`` tends to the hard top-k indicator.
        method: ``"exact"`` (closed form, the default) or ``"coordinate_descent"`` (the paper's
            dual solver with ``iters`` steps and ε-scaling from ``epsilon_init`` by ``epsilon_decay``).

    Returns:
        ``λ`` ``[batch, n]`` in the computation dtype: each row sums to its ``k``, ``0 <= λ <= 1``.
    """
    scores, k, mask = _validate_soft_topk_inputs(scores, k, mask, epsilon, method)
    if method == "exact":
        return _soft_topk_exact(scores, k, mask, epsilon)
    _validate_coordinate_descent_settings(iters, epsilon_init, epsilon_decay)
    return _soft_topk_coordinate_descent(scores, k, mask, epsilon, iters, epsilon_init, epsilon_decay)


def _validate_soft_topk_inputs(
    scores: torch.Tensor, k: int | torch.Tensor, mask: torch.Tensor | None, epsilon: float, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if method not in SOFT_TOPK_METHODS:
        raise ValueError(f"method must be one of {SOFT_TOPK_METHODS}, got {method!r}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor [batch, n], got {scores.dtype} {tuple(scores.shape)}")
    batch, n = scores.shape
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=scores.device)
    elif mask.shape != scores.shape:
        raise ValueError(f"mask must have the shape of scores {tuple(scores.shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if not torch.isfinite(scores[mask]).all():
        raise ValueError("scores must be finite at every unmasked position (got NaN or inf)")
    k = torch.as_tensor(k, device=scores.device)
    if k.is_floating_point() or k.is_complex():
        raise ValueError(f"k must be an int or an integer tensor, got dtype {k.dtype}")
    k = k.long().expand(batch) if k.dim() == 0 else k.long()
    if k.shape != (batch,):
        raise ValueError(f"k must be an int or a tensor of shape [batch]=({batch},), got shape {tuple(k.shape)}")
    n_valid = mask.sum(dim=-1)
    bad = (k < 0) | (k > n_valid)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"k must satisfy 0 <= k <= number of unmasked positions in every row; "
            f"row {row} has k={int(k[row])} and {int(n_valid[row])} unmasked positions"
        )
    compute_dtype = torch.promote_types(scores.dtype, torch.float32)
    return scores.to(compute_dtype), k, mask


def _soft_topk_exact(scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Closed-form solution ``λ_i = min(1, exp((s_i - τ)/ε))``.

    If the ``j`` largest scores are capped at 1, the others must sum to ``k - j``, which fixes
    ``τ_j = ε (logsumexp_{i>j}(s_i/ε) - log(k - j))``. The right ``j`` is the smallest one for which
    the ``(j+1)``-th score is not above ``τ_j`` (its λ is then <= 1). All candidates come from one
    reverse cumulative log-sum-exp over the sorted scores; no iteration.
    """
    with torch.no_grad():
        uncapped = _uncapped_tokens(scores.detach(), k, mask, epsilon)
    # Second pass, with gradient: τ from the uncapped scores only, shifted by their maximum so that the
    # exponents near the threshold are computed without cancellation even at tiny ε.
    z = torch.where(uncapped, scores / epsilon, float("-inf"))
    z_max = z.max(dim=-1, keepdim=True).values.detach()
    z_max = torch.where(torch.isfinite(z_max), z_max, 0.0)
    num_capped = mask.sum(dim=-1) - uncapped.sum(dim=-1)
    remaining = (k - num_capped).clamp(min=1).to(scores.dtype)[:, None]
    log_tau = torch.logsumexp(z - z_max, dim=-1, keepdim=True) - torch.log(remaining)  # τ/ε - z_max
    lam = torch.exp(torch.clamp(z - z_max - log_tau, max=0.0))
    # capped tokens, and every valid token of a row with k = n_valid, get λ = 1 exactly
    lam = torch.where(uncapped, lam, 1.0)
    return torch.where(mask & (k[:, None] > 0), lam, 0.0)


def _uncapped_tokens(scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Bool ``[batch, n]``: the valid tokens whose λ is below the upper bound 1."""
    n = scores.shape[-1]
    z_sorted, order = torch.where(mask, scores / epsilon, float("-inf")).sort(dim=-1, descending=True)
    # tail_lse[:, j] = logsumexp(z_sorted[:, j:]), the mass left for the others when the first j are capped
    tail_lse = z_sorted.flip(-1).logcumsumexp(dim=-1).flip(-1)
    j = torch.arange(n, device=scores.device)
    log_tau = tail_lse - torch.log((k[:, None] - j).clamp(min=1).to(scores.dtype))  # τ_j / ε
    consistent = (z_sorted <= log_tau) & (j < k[:, None])
    # j = k - 1 is always consistent when k < n_valid; with k = n_valid every token is capped
    num_capped = torch.where(consistent, j, n).min(dim=-1).values
    num_capped = torch.where(k >= mask.sum(dim=-1), n, num_capped)
    uncapped_sorted = j >= num_capped[:, None]
    return torch.zeros_like(mask).scatter(-1, order, uncapped_sorted) & mask


def _validate_coordinate_descent_settings(iters: int, epsilon_init: float, epsilon_decay: float) -> None:
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not (math.isfinite(epsilon_init) and epsilon_init > 0):
        raise ValueError(f"epsilon_init must be a finite number > 0, got {epsilon_init!r}")
    if not (0 < epsilon_decay <= 1):
        raise ValueError(f"epsilon_decay must be in (0, 1], got {epsilon_decay!r}")


def _soft_topk_coordinate_descent(
    scores: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    iters: int,
    epsilon_init: float,
    epsilon_decay: float,
) -> torch.Tensor:
    """The paper's solver: coordinate descent on the dual, unrolled ``iters`` times with ε-scaling.

    Dual variables: ``a`` (one per row, for the sum constraint) and ``b_i <= 0`` (the upper bounds).
    Kept to reproduce the paper; it is far from the optimum when ε is small and k is large.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    s = torch.where(mask, scores, torch.zeros_like(scores))
    log_k = torch.log(k.to(scores.dtype).clamp(min=1))[:, None]
    b = -s
    a = torch.zeros_like(log_k)
    eps = max(epsilon_init, epsilon)
    for _ in range(iters):
        logits = torch.where(mask, (s + b) / eps, neg_inf)
        a = eps * log_k - eps * torch.logsumexp(logits, dim=-1, keepdim=True)
        b = torch.clamp(-(s + a), max=0.0)
        eps = max(eps * epsilon_decay, epsilon)
    lam = torch.exp(torch.where(mask, (s + a + b) / eps, neg_inf))
    return torch.where(k[:, None] > 0, lam, torch.zeros_like(lam))


# --------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------


class Selection(NamedTuple):
    """Which tokens one conditional layer sends through its frozen layer.

    Attributes:
        index: LongTensor ``[batch, k_max]``, selected positions in ascending order. Empty slots (an
            example with fewer than ``k_max`` selected tokens) point at position 0 and are masked.
        slot_mask: bool ``[batch, k_max]``, True for slots that hold a selected token.
        weights: ``λ`` of the selected tokens ``[batch, k_max]``, 0 in empty slots.
        num_selected: LongTensor ``[batch]``, ``k`` per example.
    """

    index: torch.Tensor
    slot_mask: torch.Tensor
    weights: torch.Tensor
    num_selected: torch.Tensor

    def trace(self) -> torch.Tensor:
        """Selected positions ``[batch, k_max]`` with ``-1`` in empty slots."""
        return self.index.masked_fill(~self.slot_mask, -1)


def num_selected_tokens(valid: torch.Tensor, reduction: float) -> torch.Tensor:
    """``k = ceil(n_valid / r)`` per example ``[batch]``, from the bool padding mask ``[batch, n]``."""
    n_valid = valid.sum(dim=-1)
    if (n_valid == 0).any():
        row = int((n_valid == 0).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has no valid token; every example needs at least one")
    # the small tolerance keeps k = n/r exact when n/r is an integer despite float rounding
    return torch.ceil(n_valid.double() / reduction - 1e-9).long().clamp(min=1)


class Router(nn.Module):
    """Scores tokens with one learned vector and selects the ``k = ceil(n_valid / r)`` best per example.

    The selection is the hard top-k of the scores, the same in training and at inference; the weights
    ``λ`` come from :func:`soft_topk`. Padding is never selected; the ``forced`` positions (the pooled
    token of a classifier) always are, with ``λ = 1``.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        reduction: float,
        kind: str = "learned",
        epsilon: float = 0.1,
        method: str = "exact",
        iters: int = 20,
        epsilon_init: float = 4.0,
        epsilon_decay: float = 0.7,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.kind = kind
        self.soft_topk_options = dict(
            epsilon=epsilon, method=method, iters=iters, epsilon_init=epsilon_init, epsilon_decay=epsilon_decay
        )
        # scores start at O(1) for inputs of O(1) per dimension, as in post-LayerNorm hidden states
        self.weight = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router scores ``[batch, n]`` in float32 for hidden states ``[batch, n, hidden]``."""
        if self.kind == "random":
            return torch.rand(hidden_states.shape[:2], device=hidden_states.device)
        return hidden_states.float() @ self.weight.float()

    def forward(self, hidden_states: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor | None) -> Selection:
        """Select tokens of ``hidden_states`` ``[batch, n, hidden]``.

        Args:
            valid: bool ``[batch, n]``, False at padding.
            forced: bool ``[batch, n]`` of positions that must be selected, or None.
        """
        scores = self.scores(hidden_states)
        if not torch.isfinite(scores[valid]).all():
            raise ValueError(
                "router scores are not finite (NaN or inf): the layer input or the router weight holds "
                "non-finite values"
            )
        forced = valid & forced if forced is not None else torch.zeros_like(valid)
        num_forced = forced.sum(dim=-1)
        k = torch.maximum(num_selected_tokens(valid, self.reduction), num_forced)
        # forced tokens are capped entries of the LP (λ = 1); the rest share the remaining k
        lam = soft_topk(scores, k - num_forced, mask=valid & ~forced, **self.soft_topk_options)
        lam = lam + forced.to(lam.dtype)
        return select_top_k(scores, lam, k, valid, forced)


def select_top_k(
    scores: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor
) -> Selection:
    """Hard top-k by score with a per-row ``k``, returned as sorted positions ``[batch, k_max]``."""
    n = scores.shape[-1]
    k_max = int(k.max())
    ranking = scores.detach().masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))
    top = ranking.topk(k_max, dim=-1, sorted=True).indices
    slot_mask = torch.arange(k_max, device=scores.device) < k[:, None]
    # empty slots sort to the end (key n), then point at position 0 so that gathers stay in range
    index = top.masked_fill(~slot_mask, n).sort(dim=-1).values
    index = index.masked_fill(~slot_mask, 0)
    selected_weights = weights.gather(-1, index) * slot_mask
    return Selection(index=index, slot_mask=slot_mask, weights=selected_weights, num_selected=k)
