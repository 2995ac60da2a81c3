"""ViT: routed patches, [CLS] always kept, and r = 1 equal to the dense model with parallel adapters."""

import copy

import torch
from transformers import ViTConfig, ViTForImageClassification

from coda_adapters import CodaConfig, CodaModel, get_coda_model

from conftest import randomize_trainable
from test_coda_model import hand_adapter


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=1,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_reduction_one_equals_dense_vit_with_hand_computed_adapters():
    dense = tiny_vit()
    coda = get_coda_model(copy.deepcopy(dense), CodaConfig(reduction=1, bottleneck=8))
    randomize_trainable(coda)
    for index, layer in coda.conditional_layers().items():
        adapter = layer.adapter
        dense.vit.layers[index].register_forward_hook(lambda m, a, out, ad=adapter: out + hand_adapter(ad, a[0]))
    with torch.no_grad():
        got = coda.model.vit(pixel_values=images()).last_hidden_state
        want = dense.vit(pixel_values=images()).last_hidden_state
    assert (got - want).abs().max() <= 1e-5


def test_routing_picks_a_third_of_the_patches_and_always_cls(tmp_path):
    coda = get_coda_model(tiny_vit(), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    with torch.no_grad():
        logits = coda(pixel_values=images()).logits
    trace = coda.routing_trace()
    assert sorted(trace) == [0, 1]
    for positions in trace.values():
        assert positions.shape == (3, 6)  # ceil(17 / 3): 16 patches + [CLS]
        assert (positions[:, 0] == 0).all()
    coda.save_pretrained(tmp_path)
    again = CodaModel.from_pretrained(tiny_vit(), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=images()).logits, logits)
