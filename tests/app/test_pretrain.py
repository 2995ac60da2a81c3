"""CoDA pretraining (`coda pretrain`): the objectives against independent references, and its reduction warm-up."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.app import pretrain as pretraining
from coda_adapters.app.pretrain import PretrainConfig, pretrain, pretraining_loss

from helpers import load_example, random_ids, randomize_trainable, save_tiny_base, tiny_model


def frozen_layer_output(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen BERT layer run densely on ``x`` [batch, seq, hidden] (no padding, so no mask)."""
    output = layer(x)
    return output[0] if isinstance(output, tuple) else output


def test_layerwise_loss_is_each_layers_distance_to_its_frozen_layer_on_the_same_input():
    """Every routed layer's output against what its frozen layer computes densely on the layer's own input,
    rebuilt here from the model's hidden states and the bare transformers layers."""
    model = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(model)  # adapters with a non-zero output, routers that prefer some tokens
    ids = random_ids(3, 12)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loss = pretraining_loss(model, batch, PretrainConfig(objective="layerwise"), tokenizer=None)

    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    layers = model.conditional_layers()
    want = torch.stack(
        [F.mse_loss(states[i + 1], frozen_layer_output(layers[i].layer, states[i])) for i in model.layer_indices]
    ).mean()
    assert want > 1e-3  # routing and the adapters move the layers away from the frozen ones
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7)
    loss.backward()
    for layer in layers.values():  # the routers learn from it through the soft top-k weights
        assert layer.router.weight.grad.abs().sum() > 0
    assert not model.routing_state.record_dense_targets


def test_pretraining_warms_the_reduction_up_and_saves_the_target(tmp_path, minilm_tokenizer, monkeypatch):
    base = tiny_model("bert", vocab_size=minilm_tokenizer.vocab_size)
    model = get_coda_model(base, CodaConfig(reduction=3, bottleneck=8))
    seen = []

    def recording_loss(model, batch, config, tokenizer):
        seen.append(model.reduction)
        return pretraining_loss(model, batch, config, tokenizer)

    monkeypatch.setattr(pretraining, "pretraining_loss", recording_loss)
    config = PretrainConfig(
        objective="layerwise", steps=4, batch_size=2, max_length=16, reduction_warmup=0.5, routers_only=True
    )
    texts = ["the market rose", "the team won the match", "a new phone", "the vote was close"]
    pretrain(model, minilm_tokenizer, texts, config, tmp_path, model_name="tiny", show_progress=False)
    # the kept share of tokens falls linearly from all to 1/3 over the first two steps, the first already routed:
    # 2/3, then 1/3
    assert seen == pytest.approx([1.5, 3.0, 3.0, 3.0])
    assert model.reduction == 3.0
    assert json.loads((tmp_path / "coda_config.json").read_text())["coda_config"]["reduction"] == 3


def test_routers_only_pretraining_saves_the_routers_and_leaves_the_model_as_it_was_also_when_it_stops(
    tmp_path, minilm_tokenizer, monkeypatch
):
    from safetensors.torch import load_file

    model = get_coda_model(tiny_model("bert", vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=3))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any(".router." not in name for name in trainable)  # the adapters too
    config = PretrainConfig(
        objective="layerwise", steps=3, batch_size=2, max_length=16, reduction_warmup=1.0, routers_only=True
    )
    texts = ["the market rose", "the team won the match", "a new phone", "the vote was close"]

    pretrain(model, minilm_tokenizer, texts, config, tmp_path / "done", model_name="tiny", show_progress=False)
    saved = load_file(tmp_path / "done" / "coda_model.safetensors")
    assert saved and all(".router." in name for name in saved)
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == trainable

    steps = []

    def failing_loss(model, batch, config, tokenizer):
        steps.append(model.reduction)
        if len(steps) == 2:
            raise RuntimeError("out of memory")
        return pretraining_loss(model, batch, config, tokenizer)

    monkeypatch.setattr(pretraining, "pretraining_loss", failing_loss)
    with pytest.raises(RuntimeError, match="out of memory"):
        pretrain(model, minilm_tokenizer, texts, config, tmp_path / "stopped", model_name="tiny", show_progress=False)
    assert steps[1] < 3  # it stopped inside the warm-up
    assert model.reduction == 3.0
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == trainable
    assert not (tmp_path / "stopped" / "pretrain_metrics.json").exists()


def test_a_reduction_warmup_outside_zero_to_one_is_an_error_naming_the_flag():
    with pytest.raises(ValueError, match="--reduction-warmup"):
        PretrainConfig(reduction_warmup=1.5)


def test_the_spread_example_pools_each_text_as_if_alone(minilm_tokenizer):
    """examples/pretrained_spread.py: padding stays out of the pooled embeddings, and equal texts have no spread."""
    spread_of = load_example("pretrained_spread").pooled_spread
    model = tiny_model("bert", vocab_size=minilm_tokenizer.vocab_size)
    texts = ["the market rose", "the team won the match in the last minute", "a new phone"]
    alone = []
    for text in texts:
        batch = minilm_tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            alone.append(model(**batch).last_hidden_state[0].mean(0))
    pooled = torch.stack(alone)
    unit = F.normalize(pooled, dim=-1)
    cosines = [float(unit[i] @ unit[j]) for i in range(3) for j in range(3) if i != j]
    spread, cosine = spread_of(model, minilm_tokenizer, texts, max_length=32)
    assert spread == pytest.approx(float(pooled.std(0).mean()), rel=1e-5)
    assert cosine == pytest.approx(sum(cosines) / len(cosines), rel=1e-5)
    spread, cosine = spread_of(model, minilm_tokenizer, [texts[1]] * 3, max_length=32)
    assert spread == pytest.approx(0, abs=1e-6) and cosine == pytest.approx(1, abs=1e-6)


def test_the_spread_example_loads_routers_only_pretraining_with_zero_adapters(tmp_path):
    base = save_tiny_base(tmp_path / "base", head=False)
    model = get_coda_model(AutoModel.from_pretrained(base), CodaConfig(reduction=3, bottleneck=8))
    config = PretrainConfig(steps=2, batch_size=2, max_length=16, routers_only=True, lr=0.1)
    texts = ["the market rose", "the team won the match", "a new phone", "the vote was close"]
    pretrain(model, AutoTokenizer.from_pretrained(base), texts, config, tmp_path / "pre", model_name="tiny")
    example = load_example("pretrained_spread")
    after, before = (
        example.pretrained_backbone(base, tmp_path / "pre"),
        example.pretrained_backbone(base, tmp_path / "pre", False),
    )
    layers = [m.conditional_layers().values() for m in (after, before, model)]
    for trained, fresh, saved in zip(*layers, strict=True):
        torch.testing.assert_close(trained.router.weight, saved.router.weight)
        assert not torch.equal(fresh.router.weight, saved.router.weight)
        assert trained.adapter.up.weight.abs().max() == 0  # routers only: the adapters keep their zero output
    assert after.reduction == 3 and not after.training
