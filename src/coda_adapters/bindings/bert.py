"""BERT family (BERT, RoBERTa): absolute positions are added before the first layer, so a layer only
needs the attention mask of the selected tokens."""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import create_bidirectional_mask

from ..routing import Selection
from .base import Binding, register_binding


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
        # Padding is never routed, so only empty slots need masking. Transformers builds the mask in
        # the format the configured attention implementation expects; the encoder passes it second.
        mask = None
        if not selection.all_filled:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=selected_states, attention_mask=selection.slot_mask
            )
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
