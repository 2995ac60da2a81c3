"""Pooling for classification heads, in place of the model's pooler or of the first token a head reads
itself: the mean over the real tokens, or over the tokens the last routed layer ran through its frozen
layer."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Selection


def weighted_mean(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, hidden] -> [batch, hidden]``: the mean over tokens weighted by ``weights`` ``[batch, seq]``
    (a padding mask leaves padding out)."""
    weights = weights.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1)


class PoolingSource(Protocol):
    """What the pooler reads the padding mask and the selections from: the model's ``RoutingState``,
    filled at each forward."""

    padding_mask: torch.Tensor | None
    selections: dict[int, Selection]


class MeanPooler(nn.Module):
    """Mean of the last hidden states over the real tokens, layer-normalised (no affine weights):
    ``[batch, seq, hidden] -> [batch, hidden]``.

    It takes the place of a model's pooler (BERT's dense + tanh on ``[CLS]``), so the model's own
    classification head reads it. The normalisation keeps the head's input at one scale whatever the
    adapters do to the hidden states' size (CoDA pretraining by mean squared error, for example,
    shrinks them), so the head learns at the same pace in every configuration. The padding mask comes
    from the routing state, which the CoDA model fills from the inputs of the same forward.

    With ``routed=True`` (``pooling="routed_mean"``) the mean runs over the tokens the last routed layer
    sent through its frozen layer, each weighted by its ``λ``: the tokens that skipped the last frozen
    layer, which mean pooling would give two thirds of the weight at r = 3, are left out, as truncation
    leaves out the tokens it cuts; and the router learns from the head through ``λ``. Without a routed
    layer in the forward (a dense model, ``r = 1``) it is the mean over the real tokens.
    """

    def __init__(self, state: PoolingSource, routed: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "state", state)  # shared, holds no weights
        self.routed = routed

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self.token_weights(hidden_states)
        pooled = hidden_states.mean(dim=1) if weights is None else weighted_mean(hidden_states, weights)
        return F.layer_norm(pooled, pooled.shape[-1:])

    def token_weights(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Each token's weight in the mean ``[batch, seq]``, or None for equal weights."""
        selections = self.state.selections
        if self.routed and selections:
            return selection_weights(selections[max(selections)], hidden_states.shape[1])
        return self.state.padding_mask


def selection_weights(selection: Selection, seq_len: int) -> torch.Tensor:
    """``λ`` of the selected tokens at their positions, 0 elsewhere: ``[batch, seq_len]``.

    Empty slots point at positions that are not selected, with weight 0.
    """
    weights = selection.weights  # 0 in empty slots
    return weights.new_zeros(weights.shape[0], seq_len).scatter_add(1, selection.index, weights)


class FirstTokenPooled(nn.Module):
    """A head that reads ``features[:, 0]`` (RoBERTa's and MPNet's classifiers), given the pooled
    features in that place: ``[batch, seq, hidden] -> head([batch, 1, hidden])``."""

    def __init__(self, pooler: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.head = head

    def forward(self, features: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.head(self.pooler(features).unsqueeze(1), *args, **kwargs)
