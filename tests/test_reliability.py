"""Reliability: no pickle anywhere, hostile files, training guards, fuzzed inputs to the data loaders."""

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from coda_adapters import CodaModel
from coda_adapters.app.classify import TrainConfig, TrainingError, check_labels
from coda_adapters.app.data import DataError, LabelledTexts, load_classification_data, load_corpus

from test_save_load import base_weights, saved_adapter

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "coda_adapters"


def test_the_package_never_unpickles():
    """Only safetensors and JSON are read: no torch.load, pickle, or numpy's allow_pickle anywhere."""
    unsafe = re.compile(
        r"torch\.load\(|import pickle|from pickle|pickle\.loads?\(|allow_pickle\s*=\s*True|dill|joblib\.load"
    )
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if unsafe.search(line)
    ]
    assert not offenders, offenders


def test_weights_of_the_wrong_dtype_are_rejected_and_the_base_restored(tmp_path):
    from conftest import tiny_model

    saved_adapter(tmp_path)
    path = tmp_path / "coda_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("router.weight"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, path)
    base = tiny_model("bert", head=True)
    before = base_weights(base)
    with pytest.raises(ValueError, match=f"{name} has dtype torch.int32"):
        CodaModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())


def test_weights_holding_nan_are_rejected(tmp_path):
    from conftest import tiny_model

    saved_adapter(tmp_path)
    path = tmp_path / "coda_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("adapter.up.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(ValueError, match="holds NaN or inf"):
        CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)


def test_random_bytes_as_weights_file(tmp_path):
    from conftest import tiny_model

    saved_adapter(tmp_path)
    (tmp_path / "coda_model.safetensors").write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    )
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)


def test_out_of_range_labels_are_rejected_naming_the_example():
    with pytest.raises(ValueError, match="training example 2 has label 7, outside 0..4"):
        check_labels(LabelledTexts(["a", "b", "c"], [0, 1, 7]), 5)


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    from transformers import AutoTokenizer

    from coda_adapters import CodaConfig, get_coda_model
    from coda_adapters.app.assets import resolve_model_path
    from coda_adapters.app.classify import completed_checkpoints, train_classifier
    from coda_adapters.app.data import ClassificationData

    from conftest import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    model = get_coda_model(tiny_model("bert", head=True, vocab_size=tokenizer.vocab_size), CodaConfig(reduction=2))
    texts = [f"document number {i} about topic {i % 3}" for i in range(24)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(24)]),
        LabelledTexts(texts[:6], [0, 1, 2] * 2),
        ["a", "b", "c"],
        "test",
    )
    config = TrainConfig(epochs=2, batch_size=8, max_length=16, val_size=0)

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
