"""`coda train`'s recipe on a tiny model: the reduction warm-up and what gets saved."""

import json

import pytest

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.app.classify import TrainConfig, train_classifier
from coda_adapters.app.data import ClassificationData, LabelledTexts
from coda_adapters.app.loop import warmed_up_reduction

from helpers import tiny_model


def test_reduction_warmup_trains_from_dense_to_r_and_validates_and_saves_at_r(tmp_path, minilm_tokenizer):
    model = get_coda_model(
        tiny_model("bert", head=True, vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=4)
    )
    texts = [f"document number {i} about topic {i % 3} and more words" for i in range(40)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(40)]), LabelledTexts(texts[:6], [0, 1, 2] * 2), list("abc"), "t"
    )
    config = TrainConfig(
        epochs=2, min_steps=0, batch_size=8, max_length=16, val_size=0.2, dense_start=0.25, reduction_warmup=0.5
    )
    seen = []  # (training?, reduction) of every forward
    model.model.register_forward_pre_hook(lambda m, a: seen.append((m.training, model.reduction)))
    train_classifier(model, minilm_tokenizer, data, config, tmp_path, model_name="minilm", show_progress=False)

    trained = [r for training, r in seen if training]
    steps = len(trained)  # 32 training texts at batch 8: 4 steps per epoch
    assert steps == 8
    assert trained == pytest.approx([warmed_up_reduction(4.0, step, steps, 0.5, 0.25) for step in range(steps)])
    assert trained[:3] == [1.0, 1.0, 1.0] and trained[-2:] == [4.0, 4.0] and sorted(trained) == trained
    assert {r for training, r in seen if not training} == {4.0}  # validation and test run at the target
    saved = json.loads((tmp_path / "coda_config.json").read_text())["coda_config"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["reduction"] == 4.0 and metrics["reduction"] == 4.0
    assert metrics["train_config"]["reduction_warmup"] == 0.5 and metrics["train_config"]["dense_start"] == 0.25
    with pytest.raises(ValueError, match="--dense-start plus --reduction-warmup must be a finite number <= 1"):
        TrainConfig(dense_start=0.6, reduction_warmup=0.5)
