"""What every family must satisfy, run over the family table (text, ViT and wav2vec2): r = 1 equals the
dense model with hand-computed adapters, routing is invariant to padding, and save/load round trips."""

import copy

import pytest
import torch

from coda_adapters import CodaConfig, CodaModel, get_coda_model
from coda_adapters import layer as layer_module
from coda_adapters.bindings import supported_model_types

from helpers import (
    FAMILIES,
    FAMILY_ATTENTION,
    PADDED_FAMILY_ATTENTION,
    dense_with_hand_adapters,
    randomize_trainable,
    tiny_model,
)


def test_the_family_table_covers_every_supported_model_type():
    assert sorted(FAMILIES) == supported_model_types()


@pytest.mark.parametrize(("family", "attn"), FAMILY_ATTENTION)
@pytest.mark.parametrize("placement", ["parallel", "series"])
def test_reduction_one_equals_dense_model_with_hand_computed_adapters(family, attn, placement):
    dense = tiny_model(family, attn=attn)
    coda = get_coda_model(copy.deepcopy(dense), CodaConfig(reduction=1, bottleneck=8, adapter=placement))
    randomize_trainable(coda)
    dense_with_hand_adapters(dense, coda, placement)
    batch = FAMILIES[family].batch([12, 7, 12], 12)
    with torch.no_grad():
        got = coda(**batch).last_hidden_state
        want = dense(**batch).last_hidden_state
    valid = FAMILIES[family].valid_tokens(dense, batch, got.shape[1])
    assert not valid.all() or not FAMILIES[family].padding  # the batch holds padding where a family can
    assert (got - want)[valid].abs().max() <= 1e-5


@pytest.mark.parametrize(("family", "attn"), PADDED_FAMILY_ATTENTION)
def test_padding_invariance_at_reduction_three(family, attn):
    coda = get_coda_model(tiny_model(family, attn=attn), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    lengths = [7, 16, 11]
    batch = FAMILIES[family].batch(lengths, 16)
    with torch.no_grad():
        batched = coda(**batch).last_hidden_state
        batched_trace = coda.routing_trace()
        alone = coda(**FAMILIES[family].first_alone(batch, 7)).last_hidden_state
        alone_trace = coda.routing_trace()
    assert alone.shape[1] == 7 and batched.shape[1] == 16
    assert (batched[0, :7] - alone[0]).abs().max() <= 1e-4
    for layer, positions in batched_trace.items():
        kept = positions[0][positions[0] >= 0]
        assert torch.equal(kept, alone_trace[layer][0])
        for row, length in enumerate(lengths):
            assert (positions[row] < length).all()  # padding is never selected


@pytest.mark.parametrize(("family", "attn"), PADDED_FAMILY_ATTENTION)
def test_routed_updates_go_to_distinct_rows_of_a_padded_batch(family, attn, monkeypatch):
    """Empty slots (rows with fewer tokens than the batch's largest k) included: ONNX Runtime runs the exported
    scatter on several threads without atomics and loses one of two updates to the same row."""
    flat_indices = []
    add_tokens = layer_module.add_tokens_

    def recording_add_tokens(hidden_states, flat_index, update):
        flat_indices.append(flat_index.clone())
        return add_tokens(hidden_states, flat_index, update)

    monkeypatch.setattr(layer_module, "add_tokens_", recording_add_tokens)
    coda = get_coda_model(tiny_model(family, attn=attn), CodaConfig(reduction=3, bottleneck=8))
    with torch.no_grad():
        coda(**FAMILIES[family].batch([7, 16, 11], 16))
    assert flat_indices
    for flat_index in flat_indices:
        assert flat_index.unique().numel() == flat_index.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_identical_outputs_and_routing(tmp_path, family):
    coda = get_coda_model(tiny_model(family), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    coda.save_pretrained(tmp_path)
    loaded = CodaModel.from_pretrained(tiny_model(family), tmp_path)
    batch = FAMILIES[family].batch([14, 9], 14)
    with torch.no_grad():
        want = coda(**batch).last_hidden_state
        got = loaded(**batch).last_hidden_state
    assert torch.equal(want, got)
    assert coda.routing_trace().keys() == loaded.routing_trace().keys()
    for layer, positions in coda.routing_trace().items():
        assert torch.equal(positions, loaded.routing_trace()[layer])
    assert loaded.coda_config == coda.coda_config
