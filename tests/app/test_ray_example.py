"""examples/ray_data_predict.py on a local Ray: the same labels and probabilities as `coda predict`."""

import json

import pytest
import torch

from coda_adapters.app.classify import Encoded, load_classifier, predict_probabilities

from helpers import EXAMPLES, load_example, save_tiny_base, save_tiny_classifier

LABELS = ["business", "sport", "tech"]


@pytest.mark.slow
def test_ray_data_map_predicts_what_coda_predict_does(tmp_path, minilm_path):
    ray = pytest.importorskip("ray")
    base = save_tiny_base(tmp_path / "base")
    adapter = save_tiny_classifier(base, tmp_path / "clf", LABELS, pooling="mean")
    rows = [{"id": i, "text": f"document {i} about shares, goals or chips " * (1 + i % 4)} for i in range(40)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    example = load_example("ray_data_predict")
    ray.init(  # the workers import the example by name, as Ray pickles its class by reference
        num_cpus=4,  # Ray Data needs CPUs left for its read and write tasks beside the two workers
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(EXAMPLES), "HF_HUB_OFFLINE": "1"}},
    )
    try:
        example.predict_with_ray(str(adapter), str(tmp_path / "in.jsonl"), str(tmp_path / "out"), batch_size=16)
    finally:
        ray.shutdown()

    written = [json.loads(line) for path in sorted((tmp_path / "out").glob("*.json*")) for line in path.open()]
    assert sorted(row["id"] for row in written) == list(range(40))
    model, tokenizer, task = load_classifier(adapter)
    texts = [row["text"] for row in rows]
    expected = predict_probabilities(model, Encoded(tokenizer, texts, None, task["max_length"]), 32)[0]
    for row in written:
        got = torch.tensor([row["probabilities"][label] for label in LABELS])
        assert torch.allclose(got, expected[row["id"]], atol=1e-5)
        assert row["label"] == LABELS[int(expected[row["id"]].argmax())] and row["text"] == texts[row["id"]]
