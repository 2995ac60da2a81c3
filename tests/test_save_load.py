"""save_pretrained / from_pretrained: adapter-only files, exact round trips, loud failures, base left intact."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from coda_adapters import CodaConfig, CodaModel, get_coda_model, read_coda_config

from helpers import base_weights, random_ids, randomize_trainable, saved_adapter, tiny_model


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_round_trip_with_head_and_lora_gives_identical_logits_and_routing(tmp_path, lora_rank):
    coda = saved_adapter(tmp_path, lora_rank=lora_rank)
    loaded = CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)
    ids = random_ids(3, 14)
    with torch.no_grad():
        want, got = coda(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(want, got)
    for layer, positions in coda.routing_trace().items():
        assert torch.equal(positions, loaded.routing_trace()[layer])
    assert loaded.coda_config == coda.coda_config


def test_round_trip_keeps_the_routers_position_bias_and_the_routed_mean_pooling(tmp_path):
    config = CodaConfig(reduction=3, router_position_bins=4, pooling="routed_mean")
    coda = get_coda_model(tiny_model("bert", head=True), config)
    randomize_trainable(coda)
    coda.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "coda_model.safetensors")
    assert sum(name.endswith("router.position_bias") for name in saved) == len(coda.conditional_layers())
    loaded = CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)
    ids = random_ids(3, 14)
    with torch.no_grad():
        assert torch.equal(coda(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.coda_config == config


def test_round_trip_keeps_the_kept_ends_and_the_one_shared_router(tmp_path):
    config = CodaConfig(reduction=3, keep_first=2, keep_last=1, share_selection=True)
    coda = get_coda_model(tiny_model("bert", head=True), config)
    randomize_trainable(coda)
    coda.save_pretrained(tmp_path)
    assert sum(".router." in name for name in load_file(tmp_path / "coda_model.safetensors")) == 1
    loaded = CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)
    ids = random_ids(3, 14)
    with torch.no_grad():
        assert torch.equal(coda(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.coda_config == config


def test_saved_file_holds_only_trainable_weights(tmp_path):
    coda = saved_adapter(tmp_path)
    saved = load_file(tmp_path / "coda_model.safetensors")
    trainable = {n for n, p in coda.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    frozen = {n for n, p in coda.model.named_parameters() if not p.requires_grad}
    assert frozen and not (set(saved) & frozen)
    assert not any("word_embeddings" in n or ".layer.attention." in n for n in saved)


def test_config_file_records_the_base_model_and_settings(tmp_path):
    saved_adapter(tmp_path)
    document = json.loads((tmp_path / "coda_config.json").read_text())
    assert document["format_version"] == 1
    assert document["base_model"]["hidden_size"] == 32 and document["base_model"]["num_hidden_layers"] == 2
    assert document["coda_config"]["reduction"] == 3
    assert read_coda_config(tmp_path) == CodaConfig(reduction=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(dict(hidden_size=48), "hidden_size=32"), (dict(num_hidden_layers=3), "num_hidden_layers=2")],
)
def test_checkpoint_for_another_base_model_is_rejected_and_base_untouched(tmp_path, overrides, message):
    saved_adapter(tmp_path)
    other = tiny_model("bert", head=True, **overrides)
    before = base_weights(other)
    with pytest.raises(ValueError, match=message):
        CodaModel.from_pretrained(other, tmp_path)
    assert all(torch.equal(before[n], t) for n, t in other.state_dict().items())
    assert type(other.bert.encoder.layer[0]).__name__ == "BertLayer"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="coda_config.json"):
        CodaModel.from_pretrained(tiny_model("bert"), tmp_path)
    saved_adapter(tmp_path)
    (tmp_path / "coda_model.safetensors").unlink()
    with pytest.raises(ValueError, match="coda_model.safetensors: missing"):
        CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)


def test_truncated_weights_file_is_rejected_and_base_untouched(tmp_path):
    saved_adapter(tmp_path)
    path = tmp_path / "coda_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    base = tiny_model("bert", head=True)
    before = base_weights(base)
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        CodaModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())


def test_wrong_shape_in_weights_restores_the_base_model(tmp_path):
    saved_adapter(tmp_path)
    path = tmp_path / "coda_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("router.weight"))
    tensors[name] = torch.zeros(5)
    save_file(tensors, path)
    base = tiny_model("bert", head=True)
    with pytest.raises(ValueError, match=f"{name} has shape \\(5,\\)"):
        CodaModel.from_pretrained(base, tmp_path)
    assert type(base.bert.encoder.layer[0]).__name__ == "BertLayer"
    assert not base.bert._forward_pre_hooks


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
        (lambda d: d.pop("coda_config"), "missing field 'coda_config'"),
        (lambda d: d["coda_config"].update(reduction=0.5), "reduction must be a finite number >= 1"),
        (lambda d: d["coda_config"].update(colour="red"), "unknown CodaConfig field"),
    ],
)
def test_bad_config_files_are_rejected_with_the_file_named(tmp_path, edit, message):
    saved_adapter(tmp_path)
    path = tmp_path / "coda_config.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message) as error:
        CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)
    assert "coda_config.json" in str(error.value)


def test_config_file_that_is_not_json_is_rejected(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "coda_config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)


def test_save_leaves_no_temporary_files(tmp_path):
    saved_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coda_config.json", "coda_model.safetensors"]
