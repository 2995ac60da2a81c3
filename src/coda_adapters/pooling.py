"""Pooling for classification heads: the mean over real tokens, in place of the model's pooler or of
the first token a head reads itself."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class PaddingMaskSource(Protocol):
    """What the pooler reads the padding mask from: the model's ``RoutingState``, filled at each forward."""

    padding_mask: torch.Tensor | None


class MeanPooler(nn.Module):
    """Mean of the last hidden states over the real tokens, layer-normalised (no affine weights):
    ``[batch, seq, hidden] -> [batch, hidden]``.

    It takes the place of a model's pooler (BERT's dense + tanh on ``[CLS]``), so the model's own
    classification head reads it. The normalisation keeps the head's input at one scale whatever the
    adapters do to the hidden states' size (CoDA pretraining by mean squared error, for example,
    shrinks them), so the head learns at the same pace in every configuration. The padding mask comes
    from the routing state, which the CoDA model fills from the inputs of the same forward.
    """

    def __init__(self, state: PaddingMaskSource) -> None:
        super().__init__()
        object.__setattr__(self, "state", state)  # shared, holds no weights

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.state.padding_mask
        if mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            weights = mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1)
        return F.layer_norm(pooled, pooled.shape[-1:])


class FirstTokenPooled(nn.Module):
    """A head that reads ``features[:, 0]`` (RoBERTa's and MPNet's classifiers), given the pooled
    features in that place: ``[batch, seq, hidden] -> head([batch, 1, hidden])``."""

    def __init__(self, pooler: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.head = head

    def forward(self, features: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.head(self.pooler(features).unsqueeze(1), *args, **kwargs)
