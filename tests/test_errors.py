"""Bad configuration values and unsupported models get a ValueError naming the argument and what is allowed."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from coda_adapters import CodaConfig, get_coda_model

from helpers import random_ids, tiny_model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(reduction=0.5), "reduction must be a finite number >= 1"),
        (dict(reduction=math.inf), "reduction must be a finite number >= 1"),
        (dict(reduction=math.nan), "reduction must be a finite number >= 1"),
        (dict(bottleneck=0), "bottleneck must be an int >= 1"),
        (dict(bottleneck=-3), "bottleneck must be an int >= 1"),
        (dict(adapter="prefix"), "adapter must be one of \\('parallel', 'series', 'none'\\)"),
        (dict(router="oracle"), "router must be one of \\('learned', 'random'\\)"),
        (dict(epsilon=0), "epsilon must be a finite number > 0"),
        (dict(soft_topk_method="sinkhorn"), "soft_topk_method must be one of"),
        (dict(activation="swish2"), "activation must be one of"),
        (dict(layers=[]), "layers must be None or a non-empty list"),
        (dict(layers=[0, 0]), "layers must be None or a non-empty list"),
        (dict(lora_rank=-1), "lora_rank must be an int >= 0"),
        (dict(epsilon_decay=1.5), "epsilon_decay must be a finite number > 0 and <= 1"),
        (dict(pooling="max"), "pooling must be one of \\('cls', 'mean', 'routed_mean'\\)"),
        (dict(router_position_bins=-1), "router_position_bins must be an int >= 0"),
        (dict(router_position_bins=2.5), "router_position_bins must be an int >= 0"),
        (dict(router_position_bins=8, router="random"), "router_position_bins must be 0 with router='random', got 8"),
        (dict(keep_first=-1), "keep_first must be an int >= 0, got -1"),
        (dict(keep_last=2.5), "keep_last must be an int >= 0, got 2.5"),
        (dict(share_selection="yes"), "share_selection must be True or False, got 'yes'"),
        (dict(straight_through=1), "straight_through must be True or False, got 1"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CodaConfig(**kwargs)


def test_unsupported_architecture_lists_the_supported_ones():
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50))
    with pytest.raises(
        ValueError,
        match=r"model_type='gpt2'.*supported model types are \['bert', 'llama', 'mpnet', 'roberta', 't5', 'vit', "
        r"'wav2vec2'\].*Adding an architecture",
    ):
        get_coda_model(gpt2, CodaConfig())


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match="layers \\[5\\] do not exist: the model has layers 0..1"):
        get_coda_model(tiny_model("bert"), CodaConfig(layers=[0, 5]))


def test_unknown_module_to_save():
    with pytest.raises(ValueError, match="modules_to_save names \\['score'\\]"):
        get_coda_model(tiny_model("bert", head=True), CodaConfig(modules_to_save=["score"]))


def test_decoder_bert_is_rejected():
    with pytest.raises(ValueError, match="is_decoder=True"):
        get_coda_model(tiny_model("bert", is_decoder=True), CodaConfig())


def test_batch_row_without_valid_token():
    coda = get_coda_model(tiny_model("bert"), CodaConfig())
    ids = random_ids(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match="attention_mask row 1 has no valid token"):
        coda(input_ids=ids, attention_mask=mask)


def test_empty_batch_is_rejected():
    coda = get_coda_model(tiny_model("bert"), CodaConfig())
    with pytest.raises(ValueError, match="empty batch"):
        coda(input_ids=torch.zeros(0, 5, dtype=torch.long))


def test_non_finite_hidden_states_give_a_router_error():
    coda = get_coda_model(tiny_model("bert"), CodaConfig())
    with torch.no_grad():
        coda.model.embeddings.word_embeddings.weight[7] = float("nan")
    ids = random_ids(1, 6)
    ids[0, 2] = 7
    with pytest.raises(ValueError, match="router scores are not finite"):
        coda(input_ids=ids)


def test_wrapping_twice_is_rejected():
    coda = get_coda_model(tiny_model("bert"), CodaConfig())
    with pytest.raises(ValueError, match="already a CodaModel"):
        get_coda_model(coda, CodaConfig())
