"""ViT: absolute position embeddings are added to the patches before the first layer, and its layers
take an attention mask like BERT's (None for images), so the BERT binding's call applies. Routing picks
patches; ``[CLS]``, which the classifier reads, is always kept."""

from __future__ import annotations

from .base import register_binding
from .bert import BertBinding


@register_binding
class ViTBinding(BertBinding):
    model_types = ("vit",)
    layers_path = "layers"
    default_lora_targets = ("q_proj", "v_proj")
    first_token_head = None
