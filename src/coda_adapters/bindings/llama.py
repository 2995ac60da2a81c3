"""Llama (SmolLM2 and other Llama-architecture decoders), for prompt processing (prefill) and sequence
classification.

A routed layer runs causal attention over its selected tokens, which stay in their original order, and
gives them the rotary embeddings (cos, sin) of their original positions. The last token is always
selected: the next-token prediction and ``LlamaForSequenceClassification`` read it.

KV cache: the keys and values of a layer depend only on the layer's input, so a routed prefill writes
them for *every* prompt token (its input projected by the frozen ``k_proj``/``v_proj`` and rotated at
its position, a small fraction of the layer's cost); only attention and the MLP are skipped for the
unselected tokens. Generated tokens then run densely (one token at a time there is nothing to route)
and attend to the whole prompt at every layer, as after a dense prefill; so does any call made after
cached tokens (a continuation fed in one call), since only the prompt is routed. What differs from a dense
prefill is only that the unselected tokens' inputs to later layers did not go through earlier ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half

from ..routing import Selection
from .base import Binding, register_binding


@register_binding
class LlamaBinding(Binding):
    model_types = ("llama",)
    layers_path = "layers"
    pooled_token = "last"
    default_lora_targets = ("q_proj", "v_proj")
    default_modules_to_save = ("score",)

    def padding_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """During generation the mask also covers the cached tokens; the layers see only the new ones."""
        mask = super().padding_mask(args, kwargs)
        if mask is None:
            return None
        bound = self._mask_signature.bind_partial(*args, **kwargs).arguments
        inputs = bound.get("input_ids")
        if inputs is None:
            inputs = bound.get("inputs_embeds")
        return mask if inputs is None else mask[:, mask.shape[1] - inputs.shape[1] :]

    def routes_call(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Only the prompt is routed: calls after cached tokens (generation steps, or a continuation fed
        in one call) run densely."""
        cache = self._mask_signature.bind_partial(*args, **kwargs).arguments.get("past_key_values")
        return cache is None or cache.get_seq_length() == 0

    def before_routing(
        self, layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        cache = kwargs.get("past_key_values")
        if cache is None:
            return args, kwargs
        keys, values = prompt_keys_values(layer, hidden_states, kwargs["position_embeddings"])
        cache.update(keys, values, layer.self_attn.layer_idx)
        return args, {**kwargs, "past_key_values": None, "use_cache": False}

    def routed_layer_arguments(
        self, selected_states: torch.Tensor, selection: Selection, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        # the selected tokens are in ascending order, so a causal mask over them keeps their original order
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=selected_states,
            attention_mask=None if selection.all_filled else selection.slot_mask,
            past_key_values=None,
        )
        index = selection.index
        cos, sin = kwargs["position_embeddings"]
        kwargs = {
            **kwargs,
            "attention_mask": mask,
            "position_embeddings": (gather_positions(cos, index), gather_positions(sin, index)),
        }
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].expand(index.shape[0], -1).gather(1, index)
        return args, kwargs


def gather_positions(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[batch, k]`` of a per-position table ``[batch or 1, n, dim]`` -> ``[batch, k, dim]``."""
    batch, k = index.shape
    table = table.expand(batch, -1, -1)
    return table.gather(1, index[:, :, None].expand(batch, k, table.shape[-1]))


def prompt_keys_values(
    layer: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (rotated) and values ``[batch, kv_heads, n, head_dim]`` a Llama layer caches for its input
    ``hidden_states`` ``[batch, n, hidden]``, computed with the layer's own norm and projections."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    shape = (*hidden_states.shape[:2], -1, attention.head_dim)
    keys = attention.k_proj(normed).view(shape).transpose(1, 2)
    values = attention.v_proj(normed).view(shape).transpose(1, 2)
    cos, sin = (table.unsqueeze(1) for table in position_embeddings)
    return keys * cos + rotate_half(keys) * sin, values
