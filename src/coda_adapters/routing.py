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
from collections.abc import Iterable
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


class _Threshold(NamedTuple):
    """The exact solution of one soft top-k problem, in the form the callers need.

    ``λ_i = 1`` for the ``num_capped`` best-ranked tokens, else ``exp(min(0, (s_i - reference)/ε - log_tau))``.
    """

    top_index: torch.Tensor  # [batch, k_max] positions, best first
    in_top: torch.Tensor  # [batch, k_max] bool, slot < k
    num_capped: torch.Tensor  # [batch]
    capped: torch.Tensor  # [batch, n] bool, the tokens at λ = 1
    reference: torch.Tensor  # [batch, 1] detached score the exponents are taken relative to
    log_tau: torch.Tensor  # [batch, 1] (τ - reference)/ε, differentiable

    def weights(self, scores: torch.Tensor, epsilon: float, capped: torch.Tensor) -> torch.Tensor:
        """λ for ``scores`` (any shape broadcasting with ``[batch, 1]``), given which of them are capped."""
        exponent = torch.clamp((scores - self.reference) / epsilon - self.log_tau, max=0.0)
        return torch.where(capped, 1.0, torch.exp(exponent))


def _rank_top_k(
    scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k_max = max(k)`` best positions per row, forced ones first: ``(ranking values, index, in_top)``."""
    ranking = scores.detach().masked_fill(~valid, float("-inf"))
    if forced is not None:
        ranking = ranking.masked_fill(forced, float("inf"))
    top_values, top_index = ranking.topk(int(k.max()), dim=-1)
    in_top = torch.arange(top_index.shape[-1], device=scores.device) < k[:, None]
    return top_values, top_index, in_top


def _exact_threshold(
    scores: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    epsilon: float,
    forced: torch.Tensor | None = None,
) -> _Threshold:
    """Solve the soft top-k LP exactly; ``forced`` tokens (bool ``[batch, n]``) are held at λ = 1.

    The solution is ``λ_i = min(1, exp((s_i - τ)/ε))``. If the ``j`` best tokens are capped at 1, the
    others must sum to ``k - j``, so ``τ_j = ε (logsumexp_{i>j}(s_i/ε) - log(k - j))``; the right ``j`` is
    the smallest for which the ``(j+1)``-th score is not above ``τ_j``. Since ``j < k``, only the top
    ``k`` scores need sorting (one ``topk``, which also gives the hard selection) plus the log-sum-exp
    of all the others; a reverse cumulative log-sum-exp gives every candidate ``τ_j`` at once.
    """
    with torch.no_grad():
        top_values, top_index, in_top = _rank_top_k(scores, k, valid, forced)
        slot = torch.arange(top_index.shape[-1], device=scores.device)
        num_forced = forced.sum(dim=-1, keepdim=True) if forced is not None else 0
        free = in_top & (slot >= num_forced)  # top-k slots the LP may leave below 1
        z = scores.detach().masked_fill(~valid, float("-inf")) / epsilon
        z_top = top_values / epsilon
        z_rest = z.scatter(-1, top_index, torch.where(in_top, float("-inf"), z_top))
        free_tail = torch.where(free, z_top, float("-inf")).flip(-1).logcumsumexp(dim=-1).flip(-1)
        tail = torch.logaddexp(free_tail, z_rest.logsumexp(dim=-1, keepdim=True))
        log_tau_candidates = tail - torch.log((k[:, None] - slot).clamp(min=1).to(scores.dtype))
        consistent = free & (z_top <= log_tau_candidates)
        first = torch.where(consistent, slot, top_index.shape[-1]).min(dim=-1).values
        # rows with k = n_valid have every valid token at 1, exactly; rows with k all forced likewise
        num_capped = torch.where(k >= valid.sum(dim=-1), k, torch.minimum(first, k))
        capped = torch.zeros_like(valid).scatter(-1, top_index, slot < num_capped[:, None])
        uncapped = valid & ~capped
        reference = scores.detach().masked_fill(~uncapped, float("-inf")).max(dim=-1, keepdim=True).values
        reference = torch.where(torch.isfinite(reference), reference, 0.0)
    # with gradient: τ from the uncapped scores, relative to their maximum, so that exponents near the
    # threshold keep their precision even at tiny ε
    relative = torch.where(uncapped, (scores - reference) / epsilon, float("-inf"))
    remaining = (k - num_capped).clamp(min=1).to(scores.dtype)[:, None]
    log_tau = torch.logsumexp(relative, dim=-1, keepdim=True) - torch.log(remaining)
    return _Threshold(top_index, in_top, num_capped, capped, reference, log_tau)


def _soft_topk_exact(scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """λ ``[batch, n]`` from the exact threshold."""
    if int(k.max()) == 0:
        return torch.zeros_like(scores)
    threshold = _exact_threshold(scores, k, mask, epsilon)
    lam = threshold.weights(scores, epsilon, threshold.capped)
    return torch.where(mask & (k[:, None] > 0), lam, 0.0)


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


class TokenBudget(NamedTuple):
    """How many tokens each example keeps in every routed layer of one forward (the same for all layers).

    Attributes:
        valid: bool ``[batch, n]``, False at padding.
        num_selected: LongTensor ``[batch]``, ``k = ceil(n_valid / r)``.
        forced: bool ``[batch, n]`` of positions always kept (the pooled token, and the first and last tokens
            ``CodaConfig.keep_first``/``keep_last`` ask for), or None.
        dense: every example keeps all its tokens (``r = 1``, or very short inputs): no routing needed.
        uniform: the same ``k`` in every example: no empty slots, so the routed tokens need no attention mask
            (padding is never routed).
    """

    valid: torch.Tensor
    num_selected: torch.Tensor
    forced: torch.Tensor | None
    dense: bool
    uniform: bool


def token_budget(
    padding_mask: torch.Tensor | None,
    shape: tuple[int, int],
    reduction: float | torch.Tensor,
    forced_position: int | str | None,
    device: torch.device | str = "cpu",
    *,
    keep_first: int = 0,
    keep_last: int = 0,
) -> TokenBudget:
    """The :class:`TokenBudget` for a batch of ``shape = (batch, n)`` with an optional bool padding mask.

    ``reduction`` is one ``r`` for the batch, or a float64 tensor ``[batch]`` of one ``r`` per example
    (a :class:`~coda_adapters.stacking.StackedCodaModel` mixes adapters of different reductions).

    Always kept (:func:`forced_tokens`): ``forced_position`` (a position, ``"last"`` for each example's last
    valid token, which a causal language model predicts from, or None), and the first ``keep_first`` and
    last ``keep_last`` real tokens of each example. They count within ``k``; an example with more of them
    than ``ceil(n_valid / r)`` keeps exactly them (``k`` never drops a token that must be kept).
    """
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(
            f"empty batch: the inputs have shape [batch, seq]={tuple(shape)}; CoDA needs at least one token"
        )
    valid = torch.ones(shape, dtype=torch.bool, device=device) if padding_mask is None else padding_mask
    k = num_selected_tokens(valid, reduction)
    forced = forced_tokens(valid, forced_position, keep_first, keep_last)
    if forced is not None:
        k = torch.maximum(k, forced.sum(dim=-1))
    dense = bool((k == valid.sum(dim=-1)).all())
    uniform = bool((k == k[0]).all())
    return TokenBudget(valid, k, forced, dense, uniform)


def forced_tokens(
    valid: torch.Tensor, forced_position: int | str | None, keep_first: int = 0, keep_last: int = 0
) -> torch.Tensor | None:
    """The tokens every routed layer keeps, bool ``[batch, n]`` from the padding mask ``[batch, n]`` (None if
    there are none): position ``forced_position`` (or each row's last valid token for ``"last"``), and the
    first ``keep_first`` and last ``keep_last`` real tokens of each row (counted among real tokens, so left
    and right padding alike). Built without in-place writes, so that the ONNX exporter can trace it."""
    positions = torch.arange(valid.shape[1], device=valid.device)
    kept = []
    if forced_position == "last":
        kept.append(positions == (valid.shape[1] - 1 - valid.flip(-1).int().argmax(dim=-1))[:, None])
    elif forced_position is not None:
        kept.append(valid & (positions == positions[forced_position]))
    if keep_first or keep_last:
        place = valid.long().cumsum(dim=-1) - 1  # each token's rank among the real tokens of its row
        if keep_first:
            kept.append(valid & (place < keep_first))
        if keep_last:
            kept.append(valid & (place >= valid.sum(dim=-1, keepdim=True) - keep_last))
    if not kept:
        return None
    forced = kept[0]
    for more in kept[1:]:
        forced = forced | more
    return forced


class Selection(NamedTuple):
    """Which tokens one conditional layer sends through its frozen layer.

    Attributes:
        index: LongTensor ``[batch, k_max]``, selected positions in ascending order. Empty slots (an
            example with fewer than ``k_max`` selected tokens) come last and are masked; they point at
            distinct positions that are not selected (padding, or tokens the router left out).
        slot_mask: bool ``[batch, k_max]``, True for slots that hold a selected token.
        weights: ``λ`` of the selected tokens ``[batch, k_max]``, 0 in empty slots.
        num_selected: LongTensor ``[batch]``, ``k`` per example.
        all_filled: every slot holds a token (no example has fewer than ``k_max``).
        score_logsumexp: ``logsumexp`` of the router scores over each example's real tokens ``[batch]``, what
            :func:`router_z_loss` squares; computed by learned routers in training mode only, else None.
    """

    index: torch.Tensor
    slot_mask: torch.Tensor
    weights: torch.Tensor
    num_selected: torch.Tensor
    all_filled: bool
    score_logsumexp: torch.Tensor | None = None

    def trace(self) -> torch.Tensor:
        """Selected positions ``[batch, k_max]`` with ``-1`` in empty slots."""
        return self.index.masked_fill(~self.slot_mask, -1)


def num_selected_tokens(valid: torch.Tensor, reduction: float | torch.Tensor) -> torch.Tensor:
    """``k = ceil(n_valid / r)`` per example ``[batch]``, from the bool padding mask ``[batch, n]`` and one ``r``
    or a float64 ``r`` per example ``[batch]``."""
    n_valid = valid.sum(dim=-1)
    if (n_valid == 0).any():
        row = int((n_valid == 0).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has no valid token; every example needs at least one")
    # the small tolerance keeps k = n/r exact when n/r is an integer despite float rounding
    return torch.ceil(n_valid.double() / reduction - 1e-9).long().clamp(min=1)


class Router(nn.Module):
    """Scores tokens with one learned vector and selects the ``k = ceil(n_valid / r)`` best per example.

    The selection is the hard top-k of the scores, the same in training and at inference; the weights
    ``λ`` are the soft top-k solution (see :func:`soft_topk`), so the router learns through them. Padding
    is never selected; the budget's forced positions (the pooled token, kept first/last tokens) always are, with
    ``λ = 1``.
    A ``"random"`` router selects uniformly at random, with ``λ = 1``: the paper's ablation baseline.

    With ``straight_through`` (an addition to the paper) the selected tokens get ``λ = 1`` in the forward
    pass and the soft top-k's gradient in the backward pass (the straight-through estimator); measured, it
    did not help (README).

    With ``position_bins > 0`` (an addition to the paper) a learned bias per bin of relative position
    ``t / n_valid`` among the real tokens is added to the scores: the hidden states carry little of a
    token's absolute position, so a router of one vector cannot learn "the lead matters" (BBC News, where
    the first third of a text beats routing) without it. The bias starts at zero. Measured there (README,
    "Two router options on BBC News"), it does not close the gap to truncation.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        kind: str = "learned",
        epsilon: float = 0.1,
        method: str = "exact",
        iters: int = 20,
        epsilon_init: float = 4.0,
        epsilon_decay: float = 0.7,
        position_bins: int = 0,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        if position_bins and kind == "random":
            raise ValueError(f"position_bins must be 0 for a random router, got {position_bins}")
        self.kind = kind
        self.epsilon = epsilon
        self.method = method
        self.straight_through = straight_through
        self.coordinate_descent_options = dict(iters=iters, epsilon_init=epsilon_init, epsilon_decay=epsilon_decay)
        # scores start at O(1) for inputs of O(1) per dimension, as in post-LayerNorm hidden states
        self.weight = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))
        self.position_bias = nn.Parameter(torch.zeros(position_bins)) if position_bins else None

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router scores ``[batch, n]`` in float32 for hidden states ``[batch, n, hidden]``."""
        if self.kind == "random":
            return torch.rand(hidden_states.shape[:2], device=hidden_states.device)
        # a one-column matrix product, not a matrix-vector one: the same numbers in PyTorch, but an exported
        # graph's MatMul with a 1-D weight ran 8x slower on ONNX Runtime (2.1 against 0.25 ms at 8 x 512 x 384)
        return (hidden_states.float() @ self.weight.float().unsqueeze(-1)).squeeze(-1)

    def position_scores(self, valid: torch.Tensor) -> torch.Tensor:
        """The position bias of every token ``[batch, n]``, from the padding mask ``[batch, n]``."""
        return self.position_bias.float()[relative_position_bins(valid, self.position_bias.shape[-1])]

    def forward(self, hidden_states: torch.Tensor, budget: TokenBudget) -> Selection:
        """Select tokens of ``hidden_states`` ``[batch, n, hidden]`` within ``budget``."""
        scores = self.scores(hidden_states)
        if self.position_bias is not None:
            scores = scores + self.position_scores(budget.valid)
        valid, k, forced = budget.valid, budget.num_selected, budget.forced
        if not torch.isfinite(scores).logical_or(~valid).all():
            raise ValueError(
                "router scores are not finite (NaN or inf): the layer input or the router weight holds "
                "non-finite values"
            )
        if self.kind == "random":
            _, top_index, in_top = _rank_top_k(scores, k, valid, forced)
            top_weights = in_top.to(scores.dtype)
        elif self.method == "exact":
            threshold = _exact_threshold(scores, k, valid, self.epsilon, forced)
            top_index, in_top = threshold.top_index, threshold.in_top
            slot = torch.arange(top_index.shape[-1], device=scores.device)
            capped = slot < threshold.num_capped[:, None]
            top_weights = threshold.weights(scores.gather(-1, top_index), self.epsilon, capped)
        else:
            free = valid if forced is None else valid & ~forced
            num_forced = 0 if forced is None else forced.sum(dim=-1)
            lam = _soft_topk_coordinate_descent(
                scores, k - num_forced, free, self.epsilon, **self.coordinate_descent_options
            )
            lam = lam if forced is None else lam + forced.to(lam.dtype)
            _, top_index, in_top = _rank_top_k(scores, k, valid, forced)
            top_weights = lam.gather(-1, top_index)
        if self.straight_through and self.kind == "learned":
            top_weights = straight_through_weights(top_weights, in_top)
        selection = _in_position_order(top_index, top_weights * in_top, in_top, k, budget.uniform)
        if self.kind == "learned" and self.training:
            selection = selection._replace(score_logsumexp=scores.masked_fill(~valid, -math.inf).logsumexp(dim=-1))
        return selection


def straight_through_weights(soft: torch.Tensor, in_top: torch.Tensor) -> torch.Tensor:
    """The hard selection ``in_top`` (bool ``[batch, k_max]``) as weights, 1 for every selected token, with the
    gradient of the soft weights ``soft`` ``[batch, k_max]``: ``soft - soft.detach()`` is exactly 0 in value,
    so the forward pass sees exactly 1."""
    hard = in_top.to(soft.dtype)
    return hard + (soft - soft.detach()) if soft.requires_grad else hard


def router_z_loss(selections: Iterable[Selection]) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al., 2022) over the selections of one forward: the mean over layers of
    the mean over examples of ``logsumexp(scores)²``, the log-sum-exp taken over an example's real tokens, the
    candidates a CoDA router chooses among (an MoE router's are its experts). It keeps scores small.

    Selections without ``score_logsumexp`` (random routers, dense layers, evaluation) add nothing; with none,
    the loss is a zero scalar. Its gradient pulls each score down in proportion to its softmax share, the top
    scores most; as the soft top-k does not change when a row's scores move together, what the loss changes in
    ``λ`` is the spread it takes from the top scores, which softens ``λ`` as a larger ε would."""
    terms = [
        selection.score_logsumexp.square().mean() for selection in selections if selection.score_logsumexp is not None
    ]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def relative_position_bins(valid: torch.Tensor, bins: int) -> torch.Tensor:
    """Each token's bin ``floor(bins * t / n_valid)`` of its place ``t`` among the real tokens of its row:
    LongTensor ``[batch, n]`` from the bool padding mask ``[batch, n]``. Counting real tokens only makes
    left and right padding alike; padding gets an arbitrary bin in range (it is never selected)."""
    place = valid.long().cumsum(dim=-1) - 1
    n_valid = valid.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.div(place * bins, n_valid, rounding_mode="floor").clamp(0, bins - 1)


def _in_position_order(
    top_index: torch.Tensor, top_weights: torch.Tensor, in_top: torch.Tensor, k: torch.Tensor, uniform: bool
) -> Selection:
    """Re-order the top-k slots by position (ascending), empty slots last (see :func:`selected_first`)."""
    index, order = selected_first(top_index, in_top)
    return Selection(index, in_top, top_weights.gather(-1, order), k, all_filled=uniform)


# Added to the sort key of positions not selected, so that they sort after every selected one (sequences are
# far shorter than 2^32 tokens)
_NOT_SELECTED_OFFSET = 2**32


def selected_first(positions: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort ``positions`` ``[batch, m]`` (distinct within a row) with the ``selected`` ones (bool ``[batch, m]``)
    first, ascending, then the others, ascending: ``(sorted positions, order)``, both ``[batch, m]``.

    The positions that fill the empty slots stay distinct from each other and from the selected ones, so a
    scatter-add of the slots' zero updates never meets a real update at the same row: ONNX Runtime's
    multi-threaded ScatterND adds duplicate rows without atomics and loses updates at random
    (microsoft/onnxruntime#18048), which position 0 for every empty slot ran into.
    """
    not_selected = (~selected).to(positions.dtype) * _NOT_SELECTED_OFFSET
    keys, order = (positions + not_selected).sort(dim=-1)
    return torch.where(keys >= _NOT_SELECTED_OFFSET, keys - _NOT_SELECTED_OFFSET, keys), order
