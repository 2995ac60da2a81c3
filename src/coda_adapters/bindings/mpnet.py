"""MPNet: like BERT, plus a relative position bias ``[batch, heads, n, n]`` that the encoder computes
once and hands to every layer. A routed layer gets the rows and columns of its selected tokens, so the
bias still describes the tokens' original distances."""

from __future__ import annotations

from typing import Any

import torch

from ..routing import Selection
from .base import gather_pairwise, register_binding
from .bert import BertBinding


@register_binding
class MPNetBinding(BertBinding):
    model_types = ("mpnet",)
    default_lora_targets = ("q", "v")

    def routed_layer_arguments(
        self, selected_states: torch.Tensor, selection: Selection, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        args, kwargs = super().routed_layer_arguments(selected_states, selection, args, kwargs)
        # the encoder calls layer(hidden_states, attention_mask, position_bias, ...)
        if len(args) > 1 and args[1] is not None:
            args = (args[0], gather_pairwise(args[1], selection.index), *args[2:])
        elif kwargs.get("position_bias") is not None:
            kwargs = {**kwargs, "position_bias": gather_pairwise(kwargs["position_bias"], selection.index)}
        return args, kwargs
