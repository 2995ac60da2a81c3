"""wav2vec2: routed encoder frames, with the frame-level padding mask the encoder receives."""

import copy

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification

from coda_adapters import CodaConfig, CodaModel, get_coda_model

from conftest import randomize_trainable
from test_coda_model import hand_adapter


def tiny_wav2vec2(seed=0, head=Wav2Vec2ForSequenceClassification):
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_labels=3,
        layerdrop=0.0,
        classifier_proj_size=16,
        vocab_size=10,
    )
    return head(config).eval()


def audio(lengths, total, seed=1):
    samples = torch.randn(len(lengths), total, generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return samples * mask, mask


def test_reduction_one_equals_dense_wav2vec2_with_hand_computed_adapters():
    dense = tiny_wav2vec2()
    coda = get_coda_model(copy.deepcopy(dense), CodaConfig(reduction=1, bottleneck=8))
    randomize_trainable(coda)
    for index, layer in coda.conditional_layers().items():
        adapter = layer.adapter
        dense.wav2vec2.encoder.layers[index].register_forward_hook(
            lambda m, a, out, ad=adapter: out + hand_adapter(ad, a[0])
        )
    values, mask = audio([800, 560], 800)
    with torch.no_grad():
        got = coda.model.wav2vec2(values, attention_mask=mask).last_hidden_state
        want = dense.wav2vec2(values, attention_mask=mask).last_hidden_state
    frames = dense.wav2vec2._get_feature_vector_attention_mask(got.shape[1], mask)
    assert (got - want)[frames].abs().max() <= 1e-5


def test_routing_is_padding_invariant_and_never_picks_padded_frames():
    coda = get_coda_model(tiny_wav2vec2(), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    values, mask = audio([560, 800], 800)
    with torch.no_grad():
        together = coda.model.wav2vec2(values, attention_mask=mask).last_hidden_state
        trace = coda.routing_trace()
        alone = coda.model.wav2vec2(values[:1, :560], attention_mask=mask[:1, :560]).last_hidden_state
    valid_frames = alone.shape[1]
    assert together.shape[1] > valid_frames
    assert (together[0, :valid_frames] - alone[0]).abs().max() <= 1e-4
    for positions in trace.values():
        kept = positions[0][positions[0] >= 0]
        assert len(kept) == -(-valid_frames // 3) and (kept < valid_frames).all()


@pytest.mark.parametrize("head", [Wav2Vec2ForSequenceClassification, Wav2Vec2ForCTC])
def test_round_trip_with_either_head_restores_routing_adapters_and_head(tmp_path, head):
    coda = get_coda_model(tiny_wav2vec2(head=head), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    head_name = "lm_head" if head is Wav2Vec2ForCTC else "classifier"
    assert getattr(coda.model, head_name).weight.requires_grad
    coda.save_pretrained(tmp_path)
    loaded = CodaModel.from_pretrained(tiny_wav2vec2(head=head), tmp_path)
    values, mask = audio([560, 800], 800)
    with torch.no_grad():
        assert torch.equal(coda(values, attention_mask=mask).logits, loaded(values, attention_mask=mask).logits)
