"""`coda serve`: the HTTP API in-process (httpx over ASGI), shared backbones, batching, overload, and the
real server (uvicorn in a subprocess) draining on SIGTERM. Tiny random BERT models: a few seconds in all."""

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import torch

from coda_adapters.app.bench import lower_precision
from coda_adapters.app.classify import Encoded, load_classifier, predict_probabilities
from coda_adapters.app.serve import build_app, parse_adapter_options
from coda_adapters.app.serving import ServeSettings

from helpers import save_tiny_base, save_tiny_classifier

TOPICS = ["business", "sport", "tech"]
TEXTS = [
    "Shares rose sharply after the quarterly results.",
    "The striker scored twice in the second half.",
    "A new chip doubles battery life.",
    "Rain.",
    "The central bank kept interest rates unchanged for the third month running, citing slow growth.",
]


# --------------------------------------------------------------------------------------------------
# Tiny adapters, made once for the module
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two topic adapters on a base with a 3-label head; a 2-label and a 3-label one on a headless base."""
    root = tmp_path_factory.mktemp("serve")
    with_head = save_tiny_base(root / "base-head", head=True)
    headless = save_tiny_base(root / "base-headless", head=False)
    return {
        "topics": save_tiny_classifier(with_head, root / "topics", TOPICS, seed=1),
        "topics2": save_tiny_classifier(with_head, root / "topics2", TOPICS, seed=2),
        "yesno": save_tiny_classifier(headless, root / "yesno", ["no", "yes"], seed=3),
        "topics3": save_tiny_classifier(headless, root / "topics3", TOPICS, seed=4),
    }


@asynccontextmanager
async def client_for(app):
    """An in-process client; the app's lifespan (batching loop start and drain) runs around it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve.test") as client:
            yield client


def run(coroutine):
    return asyncio.run(coroutine)


def expected_probabilities(directory: Path, texts: list[str], batch_size: int) -> torch.Tensor:
    """What `coda predict` computes: the adapter loaded alone."""
    model, tokenizer, task = load_classifier(directory)
    return predict_probabilities(model, Encoded(tokenizer, texts, None, task["max_length"]), batch_size)[0]


def parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# --------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------


def test_predictions_equal_predict_probabilities(adapters):
    settings = ServeSettings(max_batch_size=2)
    app = build_app({"topics": adapters["topics"]}, settings)

    async def scenario():
        async with client_for(app) as client:
            return await client.post("/v1/classify", json={"adapter": "topics", "texts": TEXTS})

    response = run(scenario())
    assert response.status_code == 200
    body = response.json()
    assert body["adapter"] == "topics" and len(body["predictions"]) == len(TEXTS)
    expected = expected_probabilities(adapters["topics"], TEXTS, batch_size=2)
    for prediction, row in zip(body["predictions"], expected, strict=True):
        assert list(prediction["probabilities"]) == TOPICS
        assert torch.allclose(torch.tensor(list(prediction["probabilities"].values())), row, atol=1e-5)
        assert prediction["label"] == TOPICS[int(row.argmax())]


def test_an_onnx_export_is_served_with_onnxruntime_beside_the_pytorch_adapter(adapters, tmp_path):
    from coda_adapters.app.export import export_onnx

    export = tmp_path / "export"
    export_onnx(adapters["topics"], export, quantize_int8=True)
    served = {"torch": adapters["topics"], "onnx": export, "int8": export / "model.int8.onnx"}
    app = build_app(served, ServeSettings(max_batch_size=2))

    async def scenario():
        async with client_for(app) as client:
            health = await client.get("/health")
            answers = {
                name: await client.post("/v1/classify", json={"adapter": name, "texts": TEXTS}) for name in served
            }
            return health, answers

    health, answers = run(scenario())
    assert health.json()["adapters"] == ["torch", "onnx", "int8"]
    assert all(response.status_code == 200 for response in answers.values())

    def probabilities(name):
        rows = [p["probabilities"] for p in answers[name].json()["predictions"]]
        return torch.tensor([[row[label] for label in TOPICS] for row in rows])

    expected = expected_probabilities(adapters["topics"], TEXTS, batch_size=2)
    assert torch.allclose(probabilities("torch"), expected, atol=1e-5)
    assert torch.allclose(probabilities("onnx"), expected, atol=1e-3)  # the export's own tolerance
    assert probabilities("int8").shape == expected.shape and not torch.equal(
        probabilities("int8"), probabilities("onnx")
    )


def test_adapters_share_the_frozen_backbone_and_answer_as_if_loaded_alone(adapters):
    app = build_app(adapters, ServeSettings(max_batch_size=4, max_wait_ms=50))
    served = app.state.service.adapters

    def storage(name: str, trainable: bool) -> set[int]:
        return {p.data_ptr() for p in served[name].model.parameters() if p.requires_grad == trainable}

    for first, second in [("topics", "topics2"), ("yesno", "topics3")]:
        assert storage(first, False) and storage(first, False) == storage(second, False)
        assert not storage(first, True) & storage(second, True)
    assert not storage("topics", False) & storage("yesno", False)  # another base model: its own weights

    async def scenario():  # all four at once: one batching window (mixed where they stack)
        async with client_for(app) as client:
            requests = [client.post("/v1/classify", json={"adapter": name, "texts": TEXTS}) for name in adapters]
            return await asyncio.gather(*requests)

    for name, response in zip(adapters, run(scenario()), strict=True):
        assert response.status_code == 200, response.text
        got = torch.tensor([list(p["probabilities"].values()) for p in response.json()["predictions"]])
        assert torch.allclose(got, expected_probabilities(adapters[name], TEXTS, batch_size=4), atol=1e-5), name


def test_a_trainable_module_inside_a_routed_layer_gets_its_own_backbone(adapters, tmp_path, caplog):
    """Its saved names are the wrapped ones, so the memo alone would share it: loading must not write into
    the shared backbone (which would change the other adapter's answers)."""
    base = adapters["topics"].parent / "base-head"
    inside = save_tiny_classifier(
        base, tmp_path / "inside", TOPICS, seed=5, modules_to_save=["classifier", "intermediate"]
    )
    with caplog.at_level(logging.WARNING, logger="coda.serve"):
        served = build_app({"topics": adapters["topics"], "inside": inside}).state.service.adapters
    assert "gets its own backbone" in caplog.text
    topics_frozen = {p.data_ptr() for p in served["topics"].model.parameters() if not p.requires_grad}
    inside_all = {p.data_ptr() for p in served["inside"].model.parameters()}
    assert not topics_frozen & inside_all
    for name, directory in [("topics", adapters["topics"]), ("inside", inside)]:
        got, _ = served[name].classify(TEXTS, batch_size=4)
        assert torch.allclose(got, expected_probabilities(directory, TEXTS, batch_size=4), atol=1e-5), name


def test_health_and_metrics(adapters):
    app = build_app({"topics": adapters["topics"], "yesno": adapters["yesno"]}, ServeSettings())

    async def scenario():
        async with client_for(app) as client:
            before = await client.get("/metrics")
            await client.post("/v1/classify", json={"adapter": "yesno", "texts": ["fine", "not fine"]})
            return before, await client.get("/health"), await client.get("/metrics")

    before, health, metrics = run(scenario())
    assert health.status_code == 200 and health.json() == {"status": "ok", "adapters": ["topics", "yesno"]}
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_metrics(metrics.text)
    assert samples['coda_requests_total{adapter="yesno",status="200"}'] == 1
    assert samples['coda_batch_size_bucket{adapter="yesno",le="2"}'] == 1
    assert samples['coda_batch_size_sum{adapter="yesno"}'] == 2
    assert samples['coda_batch_size_count{adapter="topics"}'] == 0
    assert samples['coda_queue_depth{adapter="topics"}'] == 0
    assert samples['coda_request_duration_seconds_count{adapter="yesno"}'] == 1
    assert samples['coda_request_duration_seconds_bucket{adapter="yesno",le="+Inf"}'] == 1
    for kind in ("counter", "histogram", "gauge"):
        assert f" {kind}" in metrics.text
    # the process's CPU time (every thread), which the model call in between added to
    assert samples["process_cpu_seconds_total"] > parse_metrics(before.text)["process_cpu_seconds_total"] > 0


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_every_error_has_its_status_and_the_server_keeps_serving(adapters):
    app = build_app({"topics": adapters["topics"]}, ServeSettings(max_body_bytes=2000, max_queue=8))
    post = [
        (400, b'{"adapter": "topics", "texts": ['),
        (400, b"\xff\xfe not utf-8"),
        (400, b"[" * 1990),  # nested deeper than the recursion limit
        (404, json.dumps({"adapter": "nope", "texts": ["hello"]}).encode()),
        (422, json.dumps({"adapter": "topics"}).encode()),
        (422, json.dumps({"adapter": "topics", "texts": []}).encode()),
        (422, json.dumps({"adapter": "topics", "texts": "hello"}).encode()),
        (422, json.dumps({"adapter": "topics", "texts": ["ok", 3]}).encode()),
        (422, json.dumps({"adapter": "topics", "texts": ["ok", "  "]}).encode()),
        (422, json.dumps({"adapter": 3, "texts": ["hello"]}).encode()),
        (422, json.dumps(["topics", "hello"]).encode()),
        (413, json.dumps({"adapter": "topics", "texts": ["a" * 3000]}).encode()),
        (413, json.dumps({"adapter": "topics", "texts": ["hi"] * 9}).encode()),
    ]

    async def scenario():
        async with client_for(app) as client:
            answers = [await client.post("/v1/classify", content=body) for _, body in post]
            chunked = await client.post("/v1/classify", content=chunks(b"[" * 1500, b"]" * 1500))  # no length
            after = await client.post("/v1/classify", json={"adapter": "topics", "texts": ["still here"]})
            return answers, chunked, after, await client.get("/metrics")

    answers, chunked, after, metrics = run(scenario())
    assert [a.status_code for a in answers] == [status for status, _ in post]
    assert all(isinstance(a.json()["error"], str) for a in answers)
    assert chunked.status_code == 413
    assert after.status_code == 200
    samples = parse_metrics(metrics.text)
    assert samples['coda_requests_total{adapter="",status="400"}'] == 3
    assert samples['coda_requests_total{adapter="topics",status="422"}'] == 5
    assert samples['coda_requests_total{adapter="topics",status="200"}'] == 1


async def chunks(*parts: bytes):
    """A body sent in chunks, without a content-length: the limit must hold while reading."""
    for part in parts:
        yield part


def test_a_failure_in_model_code_answers_500_and_the_next_request_works(adapters, monkeypatch):
    app = build_app({"topics": adapters["topics"]}, ServeSettings())
    model = app.state.service.adapters["topics"].model

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    async def scenario():
        async with client_for(app) as client:
            monkeypatch.setattr(model, "forward", broken)
            failed = await client.post("/v1/classify", json={"adapter": "topics", "texts": ["x y"]})
            monkeypatch.undo()
            fine = await client.post("/v1/classify", json={"adapter": "topics", "texts": ["x y"]})
            return failed, fine, await client.get("/health")

    failed, fine, health = run(scenario())
    assert failed.status_code == 500 and "boom" in failed.json()["error"]
    assert fine.status_code == 200 and health.status_code == 200


def test_parse_adapter_options_and_settings_are_checked():
    assert parse_adapter_options(["a=x", "b.c-d=y=z"]) == {"a": Path("x"), "b.c-d": Path("y=z")}
    for bad in (["a"], ["a="], ["=x"], ["a b=x"], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="--adapter"):
            parse_adapter_options(bad)
    for field, value in [("max_batch_size", 0), ("max_queue", 1.5), ("max_wait_ms", -1), ("threads", 0)]:
        with pytest.raises(ValueError, match=field.replace("_", "-")):
            ServeSettings(**{field: value})
    with pytest.raises(ValueError, match=r"--quantize .*'none', 'bf16'.*'int8'"):
        ServeSettings(quantize="int8")


# --------------------------------------------------------------------------------------------------
# Batching and overload
# --------------------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched(adapters):
    app = build_app({"topics": adapters["topics"]}, ServeSettings(max_batch_size=16, max_wait_ms=200))

    async def scenario():
        async with client_for(app) as client:
            requests = [client.post("/v1/classify", json={"adapter": "topics", "texts": [t]}) for t in TEXTS * 2]
            answers = await asyncio.gather(*requests)
            return answers, await client.get("/metrics")

    answers, metrics = run(scenario())
    assert all(a.status_code == 200 for a in answers)
    expected = expected_probabilities(adapters["topics"], TEXTS * 2, batch_size=16)
    got = torch.tensor([list(a.json()["predictions"][0]["probabilities"].values()) for a in answers])
    assert torch.allclose(got, expected, atol=1e-5)
    samples = parse_metrics(metrics.text)
    assert samples['coda_batch_size_sum{adapter="topics"}'] == 10
    calls = samples['coda_batch_size_count{adapter="topics"}']
    assert calls < 10 and samples['coda_batch_size_bucket{adapter="topics",le="1"}'] < calls  # a batch of 2 or more


def test_overload_answers_only_200_or_503_and_loses_nothing(adapters, monkeypatch):
    app = build_app({"topics": adapters["topics"]}, ServeSettings(max_batch_size=1, max_wait_ms=0, max_queue=2))
    model = app.state.service.adapters["topics"].model
    forward = model.forward

    def slow(*args, **kwargs):  # a slow model: requests pile up while it runs
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)

    async def scenario():
        async with client_for(app) as client:
            requests = [
                client.post("/v1/classify", json={"adapter": "topics", "texts": [f"text {i}"]}) for i in range(30)
            ]
            answers = await asyncio.gather(*requests)
            return answers, await client.get("/health"), await client.get("/metrics")

    answers, health, metrics = run(scenario())
    statuses = [a.status_code for a in answers]
    assert len(statuses) == 30 and set(statuses) == {200, 503}
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 503)
    assert health.status_code == 200
    samples = parse_metrics(metrics.text)
    assert samples['coda_requests_total{adapter="topics",status="503"}'] == statuses.count(503)
    assert samples['coda_queue_depth{adapter="topics"}'] == 0


# --------------------------------------------------------------------------------------------------
# Mixed-adapter model calls
def test_bf16_serving_keeps_one_backbone_and_answers_as_each_adapter_alone_in_bf16(adapters):
    """`coda serve --quantize bf16`: every weight in bfloat16, the frozen backbone still one copy per base, and
    every adapter (mixed calls included) answers as `coda eval --quantize bf16` computes it alone."""
    settings = ServeSettings(max_batch_size=16, max_wait_ms=200, quantize="bf16")
    answers, metrics, app = answers_of_all_adapters_at_once(adapters, settings)
    served = app.state.service.adapters
    assert {p.dtype for adapter in served.values() for p in adapter.model.parameters()} == {torch.bfloat16}
    frozen = {name: {p.data_ptr() for p in served[name].model.parameters() if not p.requires_grad} for name in served}
    assert frozen["topics"] == frozen["topics2"] and frozen["yesno"] == frozen["topics3"]
    assert metrics['coda_model_calls_total{mode="mixed"}'] >= 1
    for name, response in answers.items():
        model, tokenizer, task = load_classifier(adapters[name])
        in_float = predict_probabilities(model, Encoded(tokenizer, TEXTS, None, task["max_length"]), 16)[0]
        lower_precision(model, "bf16")
        alone = predict_probabilities(model, Encoded(tokenizer, TEXTS, None, task["max_length"]), 16)[0]
        got = served_probabilities(response)
        assert torch.allclose(got, alone, atol=1e-5), name
        assert not torch.equal(got, in_float), name  # it did run in bfloat16


# --------------------------------------------------------------------------------------------------


def answers_of_all_adapters_at_once(adapters, settings):
    """Every adapter's request sent at once (one batching window); answers, /metrics and the app."""
    app = build_app(adapters, settings)

    async def scenario():
        async with client_for(app) as client:
            requests = [client.post("/v1/classify", json={"adapter": name, "texts": TEXTS}) for name in adapters]
            answers = await asyncio.gather(*requests)
            return answers, parse_metrics((await client.get("/metrics")).text)

    answers, metrics = run(scenario())
    return dict(zip(adapters, answers, strict=True)), metrics, app


def served_probabilities(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([list(p["probabilities"].values()) for p in response.json()["predictions"]])


@pytest.mark.parametrize("mix", [True, False])
def test_a_window_of_several_adapters_runs_in_one_mixed_call_or_one_call_per_adapter(adapters, mix):
    """topics (3 labels) and yesno (2 labels) have equal frozen bases: they stack. inside has a trainable
    module within the routed layers: it stacks with nothing and runs alone. The answers are the same either way."""
    base = adapters["topics"].parent / "base-head"
    inside = save_tiny_classifier(
        base, adapters["topics"].parent / f"inside-{mix}", TOPICS, seed=5, modules_to_save=["classifier", "query"]
    )
    served = {"topics": adapters["topics"], "yesno": adapters["yesno"], "inside": inside}
    settings = ServeSettings(max_batch_size=16, max_wait_ms=200, mix_adapters=mix)
    answers, metrics, app = answers_of_all_adapters_at_once(served, settings)
    for name, response in answers.items():
        got = served_probabilities(response)
        assert torch.allclose(got, expected_probabilities(served[name], TEXTS, batch_size=16), atol=1e-5), name
    assert answers["yesno"].json()["predictions"][0]["probabilities"].keys() == {"no", "yes"}
    mixed = app.state.service.batcher.mixed
    assert set(mixed) == ({"topics", "yesno"} if mix else set())
    # one window of 15 texts: topics' and yesno's 10 in one mixed call and inside's 5 in its own, or 3 calls
    assert metrics['coda_model_calls_total{mode="mixed"}'] == (1 if mix else 0)
    assert metrics['coda_model_calls_total{mode="single"}'] == (1 if mix else 3)
    for name in served:  # each adapter's texts are all counted, whichever calls they ran in
        assert metrics[f'coda_batch_size_sum{{adapter="{name}"}}'] == len(TEXTS)


def test_mixed_windows_answer_requests_of_every_size_as_each_adapter_alone(adapters):
    """Four adapters on two (equal) bases, requests of 1 to 5 texts at once: windows mix what arrives."""
    app = build_app(adapters, ServeSettings(max_batch_size=16, max_wait_ms=200))
    requests = [(name, TEXTS[: 1 + i]) for i, name in enumerate(adapters)] + [("topics", TEXTS[::-1])]

    async def scenario():
        async with client_for(app) as client:
            posts = [client.post("/v1/classify", json={"adapter": name, "texts": texts}) for name, texts in requests]
            return await asyncio.gather(*posts), parse_metrics((await client.get("/metrics")).text)

    answers, metrics = run(scenario())
    assert metrics['coda_model_calls_total{mode="mixed"}'] >= 1
    for (name, texts), response in zip(requests, answers, strict=True):
        expected = expected_probabilities(adapters[name], texts, batch_size=16)
        assert torch.allclose(served_probabilities(response), expected, atol=1e-5), name


def test_adapters_of_different_reductions_are_not_mixed(adapters, caplog):
    """They would stack, but a mixed call would run every example at the smaller r's cost."""
    base = adapters["topics"].parent / "base-head"
    faster = save_tiny_classifier(base, adapters["topics"].parent / "r5", TOPICS, seed=7, reduction=5)
    served = {"topics": adapters["topics"], "yesno": adapters["yesno"], "faster": faster}
    with caplog.at_level("INFO"):
        answers, _metrics, app = answers_of_all_adapters_at_once(served, ServeSettings(max_wait_ms=200))
    assert set(app.state.service.batcher.mixed) == {"topics", "yesno"}
    assert "routes at r = 5" in caplog.text
    got = served_probabilities(answers["faster"])
    assert torch.allclose(got, expected_probabilities(faster, TEXTS, batch_size=16), atol=1e-5)


def test_a_mixed_call_cuts_the_adapters_texts_into_batches_together(adapters):
    """Called directly: in the server a window over the batch size is a single request (one adapter)."""
    group = build_app(adapters, ServeSettings()).state.service.batcher.mixed["topics"]
    texts = {"yesno": TEXTS[:3], "topics2": TEXTS[::-1], "topics": TEXTS[3:]}
    results, calls = group.classify(texts, batch_size=3)
    assert calls == 4  # 10 texts in batches of 3
    for name, batch in texts.items():
        probabilities, sizes = results[name]
        assert sum(sizes) == len(batch) and len(sizes) <= calls
        assert torch.allclose(probabilities, expected_probabilities(adapters[name], batch, batch_size=3), atol=1e-5)


def test_a_failure_in_a_mixed_call_answers_500_to_its_adapters_only(adapters, monkeypatch):
    app = build_app({"topics": adapters["topics"], "yesno": adapters["yesno"]}, ServeSettings(max_wait_ms=200))
    stacked = app.state.service.batcher.mixed["topics"].model

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    async def both(client):
        posts = [client.post("/v1/classify", json={"adapter": name, "texts": ["x y"]}) for name in ("topics", "yesno")]
        return await asyncio.gather(*posts)

    async def scenario():
        async with client_for(app) as client:
            monkeypatch.setattr(stacked, "forward", broken)
            failed = await both(client)
            monkeypatch.undo()
            return failed, await both(client)

    failed, fine = run(scenario())
    assert [a.status_code for a in failed] == [500, 500] and all("boom" in a.json()["error"] for a in failed)
    assert [a.status_code for a in fine] == [200, 200]


def test_the_mix_adapters_flag():
    import argparse

    from coda_adapters.app.serve import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    assert parser.parse_args(["serve", "--adapter", "a=x"]).mix_adapters is True
    assert parser.parse_args(["serve", "--adapter", "a=x", "--no-mix-adapters"]).mix_adapters is False
    with pytest.raises(ValueError, match="--mix-adapters"):
        ServeSettings(mix_adapters="no")


# --------------------------------------------------------------------------------------------------
# The real server
# --------------------------------------------------------------------------------------------------

SERVER = """
import argparse, sys
from coda_adapters.app.serve import add_serve_parser
parser = argparse.ArgumentParser()
add_serve_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
args.run(args)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited while starting"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not start")


def test_real_server_answers_in_flight_requests_on_sigterm_and_exits_0(adapters, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = ["serve", "--adapter", f"topics={adapters['topics']}", "--port", str(port), "--max-wait-ms", "3000"]
    options += ["--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "server.log", "w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, *options, "--threads", "1"], stdout=log, stderr=log, env=env
        )
        try:
            wait_until_healthy(url, process)
            quick = httpx.post(url + "/v1/classify", json={"adapter": "topics", "texts": ["one", "two"]}, timeout=30)
            answers = []
            # waits in its batching window for 3 s: in flight when SIGTERM arrives
            in_flight = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(url + "/v1/classify", json={"adapter": "topics", "texts": ["late"]}, timeout=60)
                )
            )
            in_flight.start()
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            with pytest.raises(httpx.TransportError):  # no new connections while draining
                httpx.get(url + "/health", timeout=2)
            in_flight.join(timeout=60)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        log.seek(0)
        output = log.read()
    assert quick.status_code == 200 and len(quick.json()["predictions"]) == 2
    assert answers and answers[0].status_code == 200, output
    assert answers[0].json()["predictions"][0]["label"] in TOPICS
    assert code == 0, output
