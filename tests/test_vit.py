"""ViT: routing picks a third of the patches and always keeps [CLS], which the classifier reads.
(r = 1 against the dense model, and the backbone's round trip, are in test_family_invariants.py.)"""

import torch

from coda_adapters import CodaConfig, CodaModel, get_coda_model

from helpers import images, randomize_trainable, tiny_model


def test_routing_picks_a_third_of_the_patches_and_always_cls(tmp_path):
    coda = get_coda_model(tiny_model("vit", head=True), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    with torch.no_grad():
        logits = coda(pixel_values=images()).logits
    trace = coda.routing_trace()
    assert sorted(trace) == [0, 1]
    for positions in trace.values():
        assert positions.shape == (3, 6)  # ceil(17 / 3): 16 patches + [CLS]
        assert (positions[:, 0] == 0).all()
    coda.save_pretrained(tmp_path)
    again = CodaModel.from_pretrained(tiny_model("vit", head=True), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=images()).logits, logits)
