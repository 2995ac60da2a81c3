"""T5 (encoder-decoder, and the encoder alone): routing in the encoder; the decoder stays dense with
adapters on every layer, and its cross-attention reads every encoder output.

T5's encoder layers are called like MPNet's, ``layer(hidden_states, mask, position_bias, ...)``, but
the relative position bias is computed inside the first layer from its input length and then handed
from layer to layer through the outputs ``(hidden_states, position_bias, cross_position_bias)``. A
routed layer therefore gets the full ``n x n`` bias computed once for the original positions (by the
first layer's own bias table), uses the rows and columns of its selected tokens, and hands the full
bias on to the next layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import register_binding
from .mpnet import MPNetBinding


@register_binding
class T5Binding(MPNetBinding):
    model_types = ("t5",)
    layers_path = "encoder.block"
    adapter_layers_path = "decoder.block"
    padding_mask_module = "encoder"  # generate() calls the encoder directly, not through the full model
    pooled_token = None  # T5's classification head reads the decoder's last token
    pooler_path = None
    first_token_head = None
    default_lora_targets = ("q", "v")
    default_modules_to_save = ("classification_head",)

    def check_supported(self) -> None:
        if getattr(self.config, "is_decoder", False) and not getattr(self.config, "is_encoder_decoder", True):
            raise ValueError(f"{type(self.model).__name__} is a T5 decoder alone; CoDA routes T5's encoder")

    def before_routing(
        self, layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        if _position_bias(args, kwargs) is not None:
            return args, kwargs
        n = hidden_states.shape[1]
        bias = self._relative_attention().compute_bias(n, n, device=hidden_states.device)  # [1, heads, n, n]
        if len(args) > 1:
            return (args[0], bias, *args[2:]), kwargs
        return args, {**kwargs, "position_bias": bias}

    def routed_layer_output(
        self, layer_output: Any, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        return (hidden_states, _position_bias(args, kwargs), *layer_output[2:])

    def _relative_attention(self) -> nn.Module:
        """The encoder's attention module that owns the relative position bias table (in its first layer)."""
        encoder = self.backbone.encoder
        return next(m for m in encoder.modules() if getattr(m, "has_relative_attention_bias", False))


def _position_bias(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``position_bias`` argument of a T5 layer call (the stack passes it third, after the mask)."""
    return args[1] if len(args) > 1 else kwargs.get("position_bias")
