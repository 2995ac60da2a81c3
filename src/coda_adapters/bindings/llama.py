"""Llama (SmolLM2 and other Llama-architecture decoders), for prompt processing (prefill) and sequence
classification.

A routed layer runs causal attention over its selected tokens, which stay in their original order, and
gives them the rotary embeddings (cos, sin) of their original positions. The last token is always
selected: the next-token prediction and ``LlamaForSequenceClassification`` read it.

KV cache: a routed prefill caches, in each layer, the keys and values of the tokens that layer ran (the
others' slots hold zeros), and remembers which those were (:data:`PROMPT_TOKENS_RUN`, an attribute of the
cache). Tokens after the prompt (generated ones, or a continuation fed in one call) run densely and see, in
each layer, only the prompt tokens that layer ran: the same rule the prompt's own last token followed, so a
prefill followed by decoding computes what one routed forward over the prompt computes at its last token.
(Before this rule they attended to every prompt token, and a token a layer skipped had keys and values
from hidden states that the layers below never updated: SmolLM2's predictions after the prompt were ruined
even where its last token, which saw only routed tokens, predicted well.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

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

    def dense_layer_arguments(
        self, layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """After a routed prompt, hide from the new tokens the prompt tokens this layer did not run."""
        cache = kwargs.get("past_key_values")
        if cache is None:
            return args, kwargs
        layer_index = layer.self_attn.layer_idx
        runs = getattr(cache, PROMPT_TOKENS_RUN, {})
        past = cache.get_seq_length(layer_index)
        if past == 0:  # a prompt run densely: what an earlier prompt of this cache ran no longer applies
            runs.pop(layer_index, None)
            return args, kwargs
        if layer_index not in runs:
            return args, kwargs
        mask = hide_prompt_tokens(kwargs.get("attention_mask"), runs[layer_index], past, hidden_states.shape[1])
        return args, {**kwargs, "attention_mask": mask}

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
        if kwargs.get("past_key_values") is not None:
            kwargs["past_key_values"] = _RoutedPromptCache(kwargs["past_key_values"], selection, cos.shape[1])
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].expand(index.shape[0], -1).gather(1, index)
        return args, kwargs


def gather_positions(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[batch, k]`` of a per-position table ``[batch or 1, n, dim]`` -> ``[batch, k, dim]``."""
    batch, k = index.shape
    table = table.expand(batch, -1, -1)
    return table.gather(1, index[:, :, None].expand(batch, k, table.shape[-1]))


# the attribute of a KV cache that holds, per layer index, which prompt tokens a routed prefill ran there
# (bool [batch, prompt length]); a copy of the cache (copy.deepcopy) keeps it
PROMPT_TOKENS_RUN = "coda_prompt_tokens_run"


class _RoutedPromptCache:
    """Stands in for the KV cache while a routed layer runs its selected prompt tokens: it writes their keys
    and values to the real cache at their original positions, zeros elsewhere, records which positions those
    are, and gives the layer back the selected tokens' own keys and values (they attend only to each other)."""

    def __init__(self, cache: Any, selection: Selection, prompt_length: int) -> None:
        self.cache, self.selection, self.prompt_length = cache, selection, prompt_length

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys``/``values`` ``[batch, kv_heads, k_max, head_dim]`` of the selected tokens."""
        index = self.selection.index  # distinct positions, empty slots included (routing.selected_first)
        self.cache.update(
            self._at_positions(keys, index), self._at_positions(values, index), layer_idx, *args, **kwargs
        )
        ran = torch.zeros(index.shape[0], self.prompt_length, dtype=torch.bool, device=index.device)
        if not hasattr(self.cache, PROMPT_TOKENS_RUN):
            setattr(self.cache, PROMPT_TOKENS_RUN, {})
        getattr(self.cache, PROMPT_TOKENS_RUN)[layer_idx] = ran.scatter(1, index, self.selection.slot_mask)
        return keys, values

    def _at_positions(self, states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        batch, heads, k, dim = states.shape
        full = states.new_zeros(batch, heads, self.prompt_length, dim)
        return full.scatter(2, index[:, None, :, None].expand(batch, heads, k, dim), states)


def hide_prompt_tokens(
    mask: torch.Tensor | None, ran: torch.Tensor, past_length: int, query_length: int
) -> torch.Tensor:
    """The attention mask of ``query_length`` new tokens after ``past_length`` cached ones, with the prompt
    positions a layer did not run (False in ``ran`` ``[batch, prompt length]``) hidden.

    ``mask`` is what the model built for the layer (``[batch or 1, 1, query, past + query]``, bool or additive
    float), or None when its attention needed none (plain causal); the result keeps its format.
    """
    kv_length = past_length + query_length if mask is None else mask.shape[-1]
    prompt = ran[:, :kv_length]
    shown = torch.cat([prompt, prompt.new_ones(prompt.shape[0], kv_length - prompt.shape[1])], dim=1)[:, None, None, :]
    if mask is None:
        positions = torch.arange(kv_length, device=ran.device)
        mask = (positions[None, :] <= positions[kv_length - query_length :, None])[None, None]
    if mask.dtype == torch.bool:
        return mask & shown
    return torch.where(shown, mask, torch.finfo(mask.dtype).min)
