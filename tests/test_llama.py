"""Llama: causal attention over the selected tokens at their original rotary positions, the KV cache a
routed prefill leaves for generation, and the classification head."""

import copy

import pytest
import torch

from coda_adapters import CodaConfig, CodaModel, get_coda_model

from helpers import (
    ATTENTION,
    assert_layer_runs_the_frozen_layer_on_the_selected_tokens,
    dense_with_hand_adapters,
    hand_adapter,
    padded_batch,
    random_ids,
    randomize_trainable,
    tiny_causal_lm,
    tiny_model,
)


def left_padded_batch(lengths, seq, seed=1):
    ids, mask = padded_batch(lengths, seq, seed)
    return ids, mask.flip(-1)


def causal_mask(k, dtype=torch.float32):
    """Additive causal mask ``[1, 1, k, k]``, written out."""
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)
    return torch.zeros(k, k, dtype=dtype).masked_fill(upper, torch.finfo(dtype).min)[None, None]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_routed_layer_is_causal_over_the_selected_tokens_at_their_original_positions(attn, padding):
    base = tiny_model("llama", attn=attn, rope_theta=100.0, initializer_range=0.3)  # attention far from uniform
    frozen_layer = copy.deepcopy(base.layers[0])
    coda = get_coda_model(base, CodaConfig(reduction=3, bottleneck=8, epsilon=0.5))
    randomize_trainable(coda)
    ids, mask = (padded_batch if padding == "right" else left_padded_batch)([15, 10], 15)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes for left padding
    differences = []

    def frozen_on_selected(x_sel, positions):
        row = 0 if len(positions) == 5 else 1
        original = position_ids[row, positions][None]
        rotary = base.rotary_emb(x_sel, position_ids=original)
        mask = causal_mask(len(positions))
        right = frozen_layer(x_sel, attention_mask=mask, position_embeddings=rotary)
        renumbered = base.rotary_emb(x_sel, position_ids=torch.arange(len(positions))[None])
        differences.append(
            (right - frozen_layer(x_sel, attention_mask=mask, position_embeddings=renumbered)).abs().max()
        )
        return right

    with torch.no_grad():
        coda.model.forward = _with_position_ids(coda.model.forward, position_ids)
        assert_layer_runs_the_frozen_layer_on_the_selected_tokens(coda, ids, mask, frozen_on_selected)
    assert min(differences) > 1e-4  # the test can tell the original positions from renumbered ones


def _with_position_ids(forward, position_ids):
    return lambda **inputs: forward(**inputs, position_ids=position_ids)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_the_last_token_is_always_selected(padding):
    coda = get_coda_model(tiny_model("llama"), CodaConfig(reduction=4, bottleneck=8))
    randomize_trainable(coda)
    ids, mask = (padded_batch if padding == "right" else left_padded_batch)([16, 9, 5], 16)
    with torch.no_grad():
        coda(input_ids=ids, attention_mask=mask)
    last = 16 - 1 - mask.flip(-1).argmax(-1)
    for positions in coda.routing_trace().values():
        kept = [set(row[row >= 0].tolist()) for row in positions]
        assert all(int(last[row]) in kept[row] for row in range(3))
        assert all(mask[row, sorted(kept[row])].all() for row in range(3))  # never padding


@pytest.mark.parametrize("attn", ATTENTION)
def test_tokens_after_a_routed_prompt_see_in_each_layer_only_the_prompt_tokens_that_layer_ran(attn):
    """Reference: each frozen layer run on [the prompt tokens it ran (their inputs to it), the new tokens], at
    their original positions, plus the adapter on the new tokens; then the final norm and the LM head."""
    coda = get_coda_model(tiny_causal_lm(attn=attn), CodaConfig(reduction=3, bottleneck=8, epsilon=0.5))
    randomize_trainable(coda)
    ids = random_ids(2, 18)
    prompt, rest = ids[:, :12], ids[:, 12:]
    inputs = {}
    layers = coda.conditional_layers()
    hooks = [
        layer.register_forward_hook(lambda m, args, out, i=i: inputs.update({i: args[0]}))
        for i, layer in layers.items()
    ]
    with torch.no_grad():
        cache = coda(input_ids=prompt, use_cache=True).past_key_values
        ran = coda.routing_trace()
        for hook in hooks:
            hook.remove()
        got = coda(input_ids=rest, past_key_values=cache, use_cache=True).logits
        assert all(positions.shape == (2, 4) for positions in ran.values())  # the prompt was routed: ceil(12 / 3)

        llama = coda.model.model
        hidden, new_positions = llama.embed_tokens(rest), torch.arange(12, 18)
        for index, layer in layers.items():
            rows = []
            for row in range(2):
                kept = ran[index][row][ran[index][row] >= 0]
                x = torch.cat([inputs[index][row, kept], hidden[row]])[None]
                positions = torch.cat([kept, new_positions])[None]
                rotary = llama.rotary_emb(x, position_ids=positions)
                out = layer.layer(x, attention_mask=causal_mask(x.shape[1]), position_embeddings=rotary)
                rows.append(out[0, len(kept) :])
            hidden = torch.stack(rows) + hand_adapter(layer.adapter, hidden)
        want = coda.model.lm_head(llama.norm(hidden))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_with_every_slot_kept_a_routed_prompt_computes_the_dense_model_on_the_kept_tokens_alone(padding):
    """keep_first + keep_last fill the budget, so every layer runs the same tokens with λ = 1: the prompt and
    the tokens after it must compute what the dense model (same adapters) computes on those tokens alone, at
    their original positions; the other tokens leave no trace."""
    dense = tiny_causal_lm()
    coda = get_coda_model(copy.deepcopy(dense), CodaConfig(reduction=3, bottleneck=8, keep_first=1, keep_last=3))
    randomize_trainable(coda, std=0.1)
    dense_with_hand_adapters(dense, coda)
    ids = random_ids(2, 18)
    prompt, rest = ids[:, :12], ids[:, 12:]
    mask = torch.ones(2, 12, dtype=torch.long)
    kept = torch.tensor([[0, 9, 10, 11], [0, 9, 10, 11]])
    if padding == "left":  # row 1 starts with 3 padding tokens: its first real token is at position 3
        mask[1, :3] = 0
        kept[1, 0] = 3
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() passes them
    with torch.no_grad():
        routed = coda(input_ids=prompt, attention_mask=mask, position_ids=positions, use_cache=True)
        assert all(torch.equal(trace, kept) for trace in coda.routing_trace().values())
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
        new_positions = full_mask.cumsum(-1)[:, 12:] - 1
        cache = routed.past_key_values
        after = coda(input_ids=rest, attention_mask=full_mask, position_ids=new_positions, past_key_values=cache)

        kept_positions = positions.gather(1, kept)
        alone = dense(input_ids=prompt.gather(1, kept), position_ids=kept_positions, use_cache=True)
        alone_after = dense(input_ids=rest, position_ids=new_positions, past_key_values=alone.past_key_values)
    torch.testing.assert_close(routed.logits.gather(1, kept[..., None].expand(-1, -1, 100)), alone.logits)
    torch.testing.assert_close(after.logits, alone_after.logits)


def test_generation_continues_from_the_routed_prefill_and_decodes_densely():
    """Writing the cache does not change the prefill; the first new token is the prefill's prediction, and
    each later step (one token) runs every layer on it."""
    coda = get_coda_model(tiny_causal_lm(), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    ids, mask = left_padded_batch([12, 9], 12)
    with torch.no_grad():
        without_cache = coda(input_ids=ids, attention_mask=mask).logits[:, -1]
        with_cache = coda(input_ids=ids, attention_mask=mask, use_cache=True).logits[:, -1]
        sequences = coda.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(with_cache, without_cache)
    assert torch.equal(sequences[:, 12], without_cache.argmax(-1))
    assert sequences.shape == (2, 16)
    assert all(positions.shape == (2, 1) for positions in coda.routing_trace().values())  # the last step


def test_reduction_one_generation_equals_the_dense_model_with_adapters():
    dense = tiny_causal_lm()
    coda = get_coda_model(copy.deepcopy(dense), CodaConfig(reduction=1, bottleneck=8))
    randomize_trainable(coda, std=0.1)
    dense_with_hand_adapters(dense, coda)
    ids, mask = left_padded_batch([12, 9], 12)
    with torch.no_grad():
        got = coda.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        want = dense.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_tokens_after_a_cached_prompt_run_densely():
    coda = get_coda_model(tiny_causal_lm(), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    ids, _ = padded_batch([18], 18)
    with torch.no_grad():
        cache = coda(input_ids=ids[:, :12], use_cache=True).past_key_values
        assert coda.routing_trace()[0].shape == (1, 4)  # the prompt is routed
        same_cache = copy.deepcopy(cache)
        continued = coda(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True).logits
        assert all(positions.shape == (1, 6) for positions in coda.routing_trace().values())
        coda.routing_state.reduction = 1.0  # every layer dense, the same cache
        dense = coda(input_ids=ids[:, 12:], past_key_values=same_cache, use_cache=True).logits
    assert torch.equal(continued, dense)


def test_sequence_classifier_reads_the_routed_last_token_and_round_trips(tmp_path):
    coda = get_coda_model(tiny_model("llama", head=True), CodaConfig(reduction=3, bottleneck=8))
    assert coda.model.score.weight.requires_grad
    randomize_trainable(coda)
    ids, mask = padded_batch([10, 6], 10)
    ids[mask == 0] = 0  # the head finds the last token by the padding id
    coda.save_pretrained(tmp_path)
    loaded = CodaModel.from_pretrained(tiny_model("llama", head=True), tmp_path)
    with torch.no_grad():
        want = coda(input_ids=ids, attention_mask=mask).logits
        alone = coda(input_ids=ids[1:, :6], attention_mask=mask[1:, :6]).logits
        assert torch.equal(want, loaded(input_ids=ids, attention_mask=mask).logits)
    assert (want[1] - alone[0]).abs().max() <= 1e-4  # the head read the last real token, not padding
