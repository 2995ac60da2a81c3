"""Router initialisation from the frozen model's attention: the target against a loop reference, the fit
checked by recomputing it from an independent eager forward, and what it must leave alone."""

import pytest
import torch

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.router_init import attention_agreement, attention_received, init_routers_from_attention

from helpers import images, padded_batch, tiny_model


def test_attention_received_averages_heads_and_real_queries_only():
    generator = torch.Generator().manual_seed(0)
    attentions = torch.rand(2, 3, 5, 5, generator=generator).softmax(dim=-1)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    reference = torch.zeros(2, 5)
    for b in range(2):
        queries = [q for q in range(5) if valid[b, q]]
        for key in range(5):
            if valid[b, key]:
                values = [float(attentions[b, h, q, key]) for h in range(3) for q in queries]
                reference[b, key] = sum(values) / len(values)
    assert torch.allclose(attention_received(attentions, valid), reference, atol=1e-6)


def eager_reference(base, inputs):
    """Hidden states entering each layer and attention received in it, from a plain eager forward of ``base``."""
    implementation = base.config._attn_implementation
    base.set_attn_implementation("eager")
    with torch.no_grad():
        out = base(**inputs, output_attentions=True, output_hidden_states=True)
    base.set_attn_implementation(implementation)
    return out.hidden_states, out.attentions


def correlation(scores, target, valid):
    """Pearson correlation of per-example centred scores and targets over the real tokens."""

    def centred(values):
        mean = (values * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
        return ((values - mean) * valid)[valid]

    return float(torch.corrcoef(torch.stack([centred(scores), centred(target)]))[0, 1])


def test_routers_are_fitted_to_the_attention_their_own_layer_receives():
    """The returned fit is recomputed from an independent eager forward of the frozen model: scores of router i on
    the hidden states entering layer i against the attention received in layer i (not i - 1 or i + 1)."""
    base = tiny_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    ids, mask = padded_batch([40, 40, 31, 40, 22, 40, 40, 35], 40)
    inputs = {"input_ids": ids, "attention_mask": mask}
    hidden_states, attentions = eager_reference(base, inputs)
    coda = get_coda_model(base, CodaConfig(reduction=3)).train()
    fits = init_routers_from_attention(coda, inputs)
    valid = mask.bool()
    assert sorted(fits) == [0, 1, 2]
    for index, layer in coda.conditional_layers().items():
        scores = layer.router.scores(hidden_states[index]).detach()
        target = attention_received(attentions[index], valid)
        assert correlation(scores, target, valid) == pytest.approx(fits[index], abs=1e-4)
        assert fits[index] > 0.5
        # the scale of the default initialisation: scores with a standard deviation of 1 within an example
        mean = (scores * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
        assert float(((scores - mean) * valid)[valid].std()) == pytest.approx(1.0, abs=0.02)
    assert base.config._attn_implementation == "sdpa"  # the pass ran eager and gave the model back
    assert coda.training and coda.reduction == 3  # in train mode as it came (the pass ran in eval mode)


def test_attention_agreement_is_the_fit_over_all_tokens_and_recomputed_over_a_subset():
    """Over every real token it is the fit that initialisation returned; over a subset (here: all but each
    example's first two tokens) it is the correlation recomputed from an independent eager forward."""
    base = tiny_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    ids, mask = padded_batch([40, 40, 31, 40, 22, 40, 40, 35], 40)
    inputs = {"input_ids": ids, "attention_mask": mask}
    hidden_states, attentions = eager_reference(base, inputs)
    coda = get_coda_model(base, CodaConfig(reduction=3))
    fits = init_routers_from_attention(coda, inputs)
    assert attention_agreement(coda, inputs) == pytest.approx(fits, abs=1e-5)
    later = mask.bool().clone()
    later[:, :2] = False
    agreement = attention_agreement(coda, inputs, tokens=later)
    assert sorted(agreement) == [0, 1, 2]
    for index, layer in coda.conditional_layers().items():
        scores = layer.router.scores(hidden_states[index]).detach()
        target = attention_received(attentions[index], mask.bool())  # attention from every real query
        assert agreement[index] == pytest.approx(correlation(scores, target, later), abs=1e-4)
    assert any(abs(agreement[i] - fits[i]) > 5e-4 for i in fits)  # the subset changes the answer: the check bites


def test_only_learned_routers_of_routed_layers_change():
    base = tiny_model("vit", head=True)
    coda = get_coda_model(base, CodaConfig(reduction=2, dense_layers=[0]))
    before = {name: p.clone() for name, p in coda.named_parameters()}
    fits = init_routers_from_attention(coda, {"pixel_values": images(batch=4, size=base.config.image_size)})
    changed = {name for name, p in coda.named_parameters() if not torch.equal(p, before[name])}
    routed = [index for index, layer in coda.conditional_layers().items() if layer.router is not None]
    assert sorted(fits) == routed and 0 not in routed
    assert changed and all(".router." in name for name in changed)
    assert len(changed) == len(routed)

    random = get_coda_model(tiny_model("vit", head=True), CodaConfig(reduction=2, router="random"))
    assert init_routers_from_attention(random, {"pixel_values": images(batch=2, size=base.config.image_size)}) == {}


def test_ridge_must_be_positive():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=2))
    with pytest.raises(ValueError, match="ridge must be"):
        init_routers_from_attention(coda, {"input_ids": padded_batch([4, 4], 4)[0]}, ridge=0)


def test_a_fit_over_a_token_subset_is_the_best_linear_ranking_of_that_subset():
    """Least squares over a subset maximises the correlation there (up to the ridge): fitted over a random 60% of
    the tokens, routers agree with the attention over that subset at least as well as routers fitted over every
    token, and less well over every token; the returned fit is the agreement over the subset, and the scores
    have std 1 over it. Two short examples against 32 features, so that the two fits differ visibly."""
    base = tiny_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    ids, mask = padded_batch([40, 33], 40)
    inputs = {"input_ids": ids, "attention_mask": mask}
    subset = torch.rand(2, 40, generator=torch.Generator().manual_seed(0)) < 0.6
    hidden_states, _ = eager_reference(base, inputs)
    coda = get_coda_model(base, CodaConfig(reduction=3))
    everything_fits = init_routers_from_attention(coda, inputs)
    everything_on_subset = attention_agreement(coda, inputs, tokens=subset)
    fits = init_routers_from_attention(coda, inputs, tokens=subset)
    assert attention_agreement(coda, inputs, tokens=subset) == pytest.approx(fits, abs=1e-5)
    subset_on_everything = attention_agreement(coda, inputs)
    for i in fits:
        assert fits[i] >= everything_on_subset[i] - 1e-4 and everything_fits[i] >= subset_on_everything[i] - 1e-4
    assert any(fits[i] > everything_on_subset[i] + 1e-3 for i in fits)  # the subset fit is a different fit
    chosen = subset & mask.bool()
    for index, layer in coda.conditional_layers().items():
        scores = layer.router.scores(hidden_states[index]).detach()
        mean = (scores * chosen).sum(-1, keepdim=True) / chosen.sum(-1, keepdim=True)
        assert float(((scores - mean) * chosen)[chosen].std()) == pytest.approx(1.0, abs=0.02)


def test_a_token_subset_must_match_the_batch_and_keep_tokens():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=2))
    ids, mask = padded_batch([6, 4], 6)
    inputs = {"input_ids": ids, "attention_mask": mask}
    before = {name: p.clone() for name, p in coda.named_parameters()}
    with pytest.raises(ValueError, match=r"tokens must be a bool mask of shape \[2, 6\]"):
        init_routers_from_attention(coda, inputs, tokens=torch.ones(2, 5, dtype=torch.bool))
    only_padding = ~mask.bool()
    with pytest.raises(ValueError, match="tokens must select at least 2 real tokens of the batch, got 0"):
        attention_agreement(coda, inputs, tokens=only_padding)
    assert all(torch.equal(p, before[name]) for name, p in coda.named_parameters())  # nothing set on an error
