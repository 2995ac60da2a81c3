"""wav2vec2: routing never picks padded frames, with the frame-level mask the encoder receives, and both
heads (sequence classification, CTC) round trip. (r = 1 against the dense model, padding invariance and
the backbone's round trip are in test_family_invariants.py.)"""

import pytest
import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification

from coda_adapters import CodaConfig, CodaModel, get_coda_model

from helpers import audio, randomize_trainable, tiny_model


def test_routing_never_picks_padded_frames_and_keeps_a_third_of_the_valid_ones():
    coda = get_coda_model(tiny_model("wav2vec2", head=True), CodaConfig(reduction=3, bottleneck=8))
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
    coda = get_coda_model(tiny_model("wav2vec2", head=head), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    head_name = "lm_head" if head is Wav2Vec2ForCTC else "classifier"
    assert getattr(coda.model, head_name).weight.requires_grad
    coda.save_pretrained(tmp_path)
    loaded = CodaModel.from_pretrained(tiny_model("wav2vec2", head=head), tmp_path)
    values, mask = audio([560, 800], 800)
    with torch.no_grad():
        assert torch.equal(coda(values, attention_mask=mask).logits, loaded(values, attention_mask=mask).logits)
