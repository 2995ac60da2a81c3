"""T5: routed encoder with the relative position bias of the original positions, dense decoder with
adapters, generation, and the heads."""

import copy

import pytest
import torch
from transformers import T5ForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.t5.modeling_t5 import T5Attention

from coda_adapters import CodaConfig, CodaModel, get_coda_model

from helpers import (
    ATTENTION,
    assert_layer_runs_the_frozen_layer_on_the_selected_tokens,
    dense_with_hand_adapters,
    padded_batch,
    randomize_trainable,
    tiny_model,
)


def tiny_t5(attn="eager", seed=0):
    return tiny_model("t5", head=T5ForConditionalGeneration, attn=attn, seed=seed, eos_token_id=1)


def relative_position_bias(attention, positions):
    """T5's bias between the tokens at ``positions`` ``[k]``, built from those positions: ``[1, heads, k, k]``."""
    relative = positions[None, :] - positions[:, None]  # key position - query position
    buckets = T5Attention._relative_position_bucket(
        relative,
        bidirectional=True,
        num_buckets=attention.relative_attention_num_buckets,
        max_distance=attention.relative_attention_max_distance,
    )
    return attention.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("layer", [0, 1])
def test_routed_encoder_layer_sees_the_position_bias_of_the_original_positions(attn, layer):
    """Layer 0 owns the bias table; layer 1 gets the bias handed on by layer 0: both must see the original
    distances between their selected tokens, not those of a renumbered shorter sequence."""
    base = tiny_model("t5", attn=attn)
    frozen_layer = copy.deepcopy(base.encoder.block[layer])
    table = copy.deepcopy(base.encoder.block[0].layer[0].SelfAttention)
    coda = get_coda_model(base, CodaConfig(reduction=3, bottleneck=8, epsilon=0.5))
    randomize_trainable(coda)
    differences = []

    def frozen_on_selected(x_sel, positions):
        mask = create_bidirectional_mask(base.config, x_sel, torch.ones(1, len(positions)))
        right = frozen_layer(x_sel, mask, relative_position_bias(table, positions))[0]
        renumbered = relative_position_bias(table, torch.arange(len(positions)))
        differences.append((right - frozen_layer(x_sel, mask, renumbered)[0]).abs().max())
        return right

    ids, mask = padded_batch([15, 10], 15)
    assert_layer_runs_the_frozen_layer_on_the_selected_tokens(coda, ids, mask, frozen_on_selected, layer=layer)
    assert min(differences) > 1e-4  # the test can tell the original positions from renumbered ones


@pytest.mark.parametrize("placement", ["parallel", "series"])
def test_reduction_one_equals_dense_seq2seq_with_adapters_in_encoder_and_decoder(placement):
    dense = tiny_t5()
    coda = get_coda_model(copy.deepcopy(dense), CodaConfig(reduction=1, bottleneck=8, adapter=placement))
    randomize_trainable(coda)
    assert len(coda.binding.adapter_layers()) == 2  # the decoder's layers carry adapters
    dense_with_hand_adapters(dense, coda, placement)
    ids, mask = padded_batch([12, 7, 12], 12)
    decoder_ids = torch.randint(2, 100, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = coda(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        want = dense(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        greedy_got = coda.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        greedy_want = dense.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(greedy_got, greedy_want)


def test_routed_generation_runs_the_decoder_densely_over_every_encoder_output():
    coda = get_coda_model(tiny_t5(), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    ids, mask = padded_batch([12, 8], 12)
    cross_keys = []
    cross_attention = coda.model.decoder.block[0].layer.layer[1].EncDecAttention
    cross_attention.k.register_forward_hook(lambda module, args, output: cross_keys.append(args[0].shape))
    with torch.no_grad():
        sequences = coda.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        encoder_trace = coda.routing_trace()
        teacher_forced = coda(input_ids=ids, attention_mask=mask, decoder_input_ids=sequences[:, :-1]).logits
    assert sequences.shape[0] == 2
    assert cross_keys and all(shape[1] == 12 for shape in cross_keys)
    assert sorted(encoder_trace) == [0, 1] and encoder_trace[0].shape == (2, 4)  # ceil(12 / 3)
    # greedy decoding with the KV cache agrees with one teacher-forced pass over the same tokens
    assert torch.equal(teacher_forced.argmax(-1), sequences[:, 1:])


@pytest.mark.parametrize("head", ["classifier", "seq2seq"])
def test_t5_round_trip_gives_identical_outputs(tmp_path, head):
    make = (lambda: tiny_model("t5", head=True)) if head == "classifier" else tiny_t5
    coda = get_coda_model(make(), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    ids, mask = padded_batch([10, 6], 10)
    ids[0, 9] = ids[1, 5] = 1  # one </s> per example, which T5's classification head reads
    inputs = dict(input_ids=ids, attention_mask=mask)
    if head == "seq2seq":
        inputs["decoder_input_ids"] = ids[:, :3]
    coda.save_pretrained(tmp_path)
    loaded = CodaModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(coda(**inputs).logits, loaded(**inputs).logits)
