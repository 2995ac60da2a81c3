"""examples/router_drift.py: the start it rebuilds is the start the experiment runner trained from (plain and
pretrained rows), and its spreads are those of the frozen model's own hidden states."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from coda_adapters.app import experiment
from coda_adapters.app.classify import TrainConfig
from coda_adapters.app.data import ClassificationData, LabelledTexts
from coda_adapters.app.experiment import Preset, Row, train_row
from coda_adapters.app.pretrain import PretrainConfig

from helpers import load_example, save_tiny_base

WORDS = {"sport": "match goal team win", "business": "shares market bank profit", "weather": "rain snow wind cold"}


def tiny_data() -> ClassificationData:
    texts, labels = [], []
    for label, words in enumerate(WORDS.values()):
        for i in range(6):
            texts.append(f"today {words.split()[i % 4]} and {words.split()[(i + 1) % 4]} again in the north")
            labels.append(label)
    return ClassificationData(LabelledTexts(texts, labels), LabelledTexts(texts[::4], labels[::4]), list(WORDS), "t")


@pytest.mark.parametrize("pretrained", [False, True])
def test_the_rebuilt_start_is_the_start_training_had_and_the_spreads_are_the_frozen_models(
    tmp_path, monkeypatch, minilm_path, pretrained
):
    example = load_example("router_drift")
    base = save_tiny_base(tmp_path / "base", head=True)
    row = Row("CoDA r=2", {"reduction": 2, "bottleneck": 8}, pretrain=pretrained)
    preset = Preset(
        rows=[row],
        train=TrainConfig(epochs=1, min_steps=0, batch_size=6, lr=3e-2, max_length=16, val_size=0),
        pretrain=PretrainConfig(steps=2, batch_size=6, lr=3e-2, max_length=16, routers_only=True),
    )
    started_from = {}
    real_train = experiment.train_classifier

    def recording_train(model, *args, **kwargs):  # the routers as fine-tuning starts
        started_from["routers"] = example.router_weights(model)
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(experiment, "train_classifier", recording_train)
    run = tmp_path / "run"
    train_row(row, preset, tiny_data(), run, str(base), seed=3)

    rebuilt = example.router_weights(example.starting_model(run))
    assert len(rebuilt) == 2
    for mine, theirs in zip(rebuilt, started_from["routers"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)

    texts = ["the market fell", "snow and wind in the north today"]
    report = example.drift_report(run, texts)
    trained = example.router_weights(example.load_classifier(run)[0])
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    frozen = AutoModelForSequenceClassification.from_pretrained(base).eval()  # the bare transformers model
    with torch.no_grad():
        states = frozen(**batch, output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()
    for layer, (start, end) in enumerate(zip(rebuilt, trained, strict=True)):
        assert not torch.equal(start, end)  # training moved the router
        assert report[layer]["cosine"] == pytest.approx(float(F.cosine_similarity(start, end, dim=0)), abs=1e-6)
        scores_start, scores_end = states[layer][valid] @ start, states[layer][valid] @ end
        assert report[layer]["spread_start"] == pytest.approx(float(scores_start.std()), rel=1e-4)
        assert report[layer]["spread_end"] == pytest.approx(float(scores_end.std()), rel=1e-4)
    # the first layer's input is the embeddings, which no adapter has touched
    assert report[0]["spread_tuned"] == pytest.approx(report[0]["spread_end"], rel=1e-4)


def test_a_run_whose_routers_were_fitted_is_refused_with_the_reason(tmp_path):
    example = load_example("router_drift")
    (tmp_path / "metrics.json").write_text('{"train_config": {"seed": 0, "router_init": "attention"}}')
    with pytest.raises(ValueError, match=r"--router-init attention\).*random draw or a CoDA pretraining"):
        example.starting_model(tmp_path)
