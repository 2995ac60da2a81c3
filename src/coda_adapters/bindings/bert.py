"""BERT family (BERT, RoBERTa): absolute positions are added before the first layer, so a layer only
needs the attention mask of the selected tokens."""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import create_bidirectional_mask

from ..routing import Selection
from .base import Binding, register_binding


def selected_keys_mask(config: Any, selected_states: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask of a routed layer's selected tokens ``[batch, k, hidden]``, from ``slot_mask``
    (bool ``[batch, k]``, True for a slot that holds a token), in the format the configured attention expects.

    For eager and SDPA attention it is ``[batch, 1, 1, k]``, broadcast over heads and queries: only keys need
    masking (an empty slot's own output is never scattered back), and Transformers' bidirectional mask repeats
    the same row for every query (``[batch, 1, k, k]``), whose building and adding took 6% of an exported int8
    graph's kernel time; with this one that graph ran 1.01-1.04x faster (README, "Speed"). Other
    implementations get Transformers' mask."""
    implementation = config._attn_implementation
    keys = slot_mask[:, None, None, :]
    if implementation == "sdpa":
        return keys
    if implementation == "eager":  # additive: 0 for a token, the dtype's minimum for an empty slot
        zeros = torch.zeros(keys.shape, dtype=selected_states.dtype, device=selected_states.device)
        return zeros.masked_fill(~keys, torch.finfo(selected_states.dtype).min)
    return create_bidirectional_mask(config=config, inputs_embeds=selected_states, attention_mask=slot_mask)


@register_binding
class BertBinding(Binding):
    model_types = ("bert", "roberta")
    layers_path = "encoder.layer"
    pooled_token = 0  # [CLS] / <s>, read by the pooler and the classification heads
    pooler_path = "pooler"
    first_token_head = "classifier"  # RoBERTa's classifier reads <s> itself (its model has no pooler)
    default_lora_targets = ("query", "value")
    default_modules_to_save = ("classifier",)

    def check_supported(self) -> None:
        if getattr(self.config, "is_decoder", False):
            raise ValueError(
                f"{type(self.model).__name__} is configured as a decoder (is_decoder=True); CoDA routing of the "
                "BERT family supports encoders only"
            )

    def routed_layer_arguments(
        self, selected_states: torch.Tensor, selection: Selection, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        # Padding is never routed, so only empty slots need masking; the encoder passes the mask second.
        mask = None if selection.all_filled else selected_keys_mask(self.config, selected_states, selection.slot_mask)
        if args:
            args = (mask, *args[1:])
        else:
            kwargs = {**kwargs, "attention_mask": mask}
        if kwargs.get("position_ids") is not None:
            kwargs = {
                **kwargs,
                "position_ids": kwargs["position_ids"].expand(selection.index.shape[0], -1).gather(1, selection.index),
            }
        return args, kwargs
