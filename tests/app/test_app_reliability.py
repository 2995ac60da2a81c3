"""Reliability of the application: training guards (labels, non-finite loss) and fuzzed inputs to the data
loaders. (The library's file handling is in tests/test_reliability.py.)"""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from coda_adapters.app.classify import TrainConfig, check_labels
from coda_adapters.app.data import DataError, LabelledTexts, load_classification_data, load_corpus
from coda_adapters.app.loop import TrainingError

from helpers import tiny_model


def test_out_of_range_labels_are_rejected_naming_the_example():
    with pytest.raises(ValueError, match="training example 2 has label 7, outside 0..4"):
        check_labels(LabelledTexts(["a", "b", "c"], [0, 1, 7]), 5)


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    from transformers import AutoTokenizer

    from coda_adapters import CodaConfig, get_coda_model
    from coda_adapters.app.assets import resolve_model_path
    from coda_adapters.app.classify import train_classifier
    from coda_adapters.app.data import ClassificationData
    from coda_adapters.app.loop import completed_checkpoints

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    model = get_coda_model(tiny_model("bert", head=True, vocab_size=tokenizer.vocab_size), CodaConfig(reduction=2))
    texts = [f"document number {i} about topic {i % 3}" for i in range(24)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(24)]),
        LabelledTexts(texts[:6], [0, 1, 2] * 2),
        ["a", "b", "c"],
        "test",
    )
    config = TrainConfig(epochs=2, min_steps=0, batch_size=8, max_length=16, val_size=0)

    steps = {"count": 0}

    def poison(module, args, output):  # from the second epoch on, the head returns NaN
        steps["count"] += 1
        return output * float("nan") if steps["count"] > 3 else output

    model.model.classifier.register_forward_hook(poison)
    with pytest.raises(TrainingError, match="non-finite loss .* at epoch 2; stopped, the last good checkpoint"):
        train_classifier(model, tokenizer, data, config, tmp_path, model_name="minilm", show_progress=False)
    checkpoints = completed_checkpoints(tmp_path)
    assert [p.name for p in checkpoints] == ["epoch-1"]
    assert torch.isfinite(
        torch.cat([t.flatten() for t in load_file(checkpoints[0] / "coda_model.safetensors").values()])
    ).all()
    assert not (tmp_path / "metrics.json").exists()


@given(st.binary(max_size=2000), st.sampled_from([".csv", ".tsv", ".jsonl", ".txt"]))
def test_random_bytes_give_a_data_error_or_valid_data(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(content)
    try:
        if suffix == ".txt":
            texts = load_corpus(str(path))
            assert texts and all(t.strip() for t in texts)
        else:
            data = load_classification_data(str(path), test=str(path))
            assert len(data.train.texts) == len(data.train.labels) > 0
    except DataError as error:
        assert str(path) in str(error)


def test_very_long_lines_and_texts_are_read_whole(tmp_path):
    path = tmp_path / "long.jsonl"
    long_text = "word " * 200_000
    path.write_text(
        json.dumps({"text": long_text, "label": "a"}) + "\n" + json.dumps({"text": "b", "label": "b"}) + "\n"
    )
    data = load_classification_data(str(path), test=str(path))
    assert max(len(t) for t in data.train.texts) == len(long_text)
