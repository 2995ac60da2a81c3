"""The BERT binding's mask of the selected tokens against the mask Transformers builds for the same slots."""

import pytest
import torch
from transformers import BertConfig
from transformers.masking_utils import create_bidirectional_mask

from coda_adapters.bindings.bert import selected_keys_mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_keys_mask_is_transformers_mask_with_one_row_for_every_query(attn, dtype):
    config = BertConfig(hidden_size=8, num_attention_heads=2)
    config._attn_implementation = attn
    slot_mask = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, False, False]])
    states = torch.randn(3, 4, 8, dtype=dtype)
    mask = selected_keys_mask(config, states, slot_mask)
    reference = create_bidirectional_mask(config=config, inputs_embeds=states, attention_mask=slot_mask)
    assert mask.shape == (3, 1, 1, 4) and mask.dtype == reference.dtype
    assert torch.equal(mask.expand_as(reference), reference)
