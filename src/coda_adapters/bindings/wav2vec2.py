"""wav2vec2: the convolutional feature encoder and the convolutional position embedding run densely on
every frame; routing acts on the Transformer encoder's frames. Its layers take a BERT-style attention
mask (as a keyword), built from the frame-level padding mask that the encoder receives."""

from __future__ import annotations

from .base import register_binding
from .bert import BertBinding


@register_binding
class Wav2Vec2Binding(BertBinding):
    model_types = ("wav2vec2",)
    layers_path = "encoder.layers"
    padding_mask_module = "encoder"  # the backbone's own mask covers audio samples, not frames
    pooled_token = None  # the heads pool all frames (sequence classification) or read each one (CTC)
    pooler_path = None
    first_token_head = None
    default_lora_targets = ("q_proj", "v_proj")
    default_modules_to_save = ("projector", "classifier", "lm_head")
