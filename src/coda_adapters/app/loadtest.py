"""``coda loadtest``: a bounded load test of the real ``coda serve`` with CoDA adapters at several reductions.

One adapter per reduction is built on the same base model and saved as ``coda train`` would. One server
(a ``coda serve`` subprocess on loopback) holds them all: they share the frozen backbone, as in a real
deployment, and one server start is cheaper than one per setting. Closed-loop clients (each sends its
next request when the last is answered) post real BBC News texts cut to exactly ``seq_len`` tokens.
Within a concurrency level the adapters take turns in rounds, their order rotated every round, so that
noise from the machine (2 shared cores, other jobs) hits every reduction alike; ratios are against
``r = 1`` (the dense parallel adapter) at the same concurrency.

With ``--runtimes onnxruntime int8`` every adapter is also exported (``coda export --int8``) and served
from the same server on ONNX Runtime, float and int8, beside its PyTorch self.

The adapters have random weights: the work per request is fixed by shapes (each routed layer runs on
``k = ceil(n / r)`` tokens; the top-k and the exact soft top-k are sorts), not by the weights' values, so
the speed is that of a trained adapter. The load generator (an ``aiohttp`` client, about 0.2 ms of CPU per
request) runs on the same machine as the server and takes some of its CPU: absolute numbers are a lower
bound, ratios between reductions are fair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import check_choice, check_number
from ..files import atomic_write, read_json_object, write_json
from .options import SERVE_QUANTIZE_CHOICES, add_subcommand, flag, output_directory

BASELINE = 1.0  # the dense parallel adapter: ratios are against it
TEXT_SEED = 0  # the order BBC News texts are taken in
WEIGHT_STD = 0.02  # the scale of trained adapter weights; any non-zero value costs the same
STARTUP_SECONDS = 300.0
STOP_SECONDS = 60.0
REQUEST_TIMEOUT = 120.0
NOTE = (
    "Adapters have random weights: the work per request is set by shapes (k = ceil(n / r) tokens per routed "
    "layer), not by the weights, so the speed is that of trained adapters. p50/p99: answered requests only; "
    "texts/call: the server's mean batch size (from /metrics). CPU ms/text: CPU time of the server (every thread) "
    "and of the load generator during the rounds, per text answered; on a machine they share, what the load "
    "generator takes is not there for the server."
)
BATCH_SIZE_LINE = re.compile(r'^coda_batch_size_(sum|count)\{adapter="([^"]*)"\} (\S+)$', re.MULTILINE)
CPU_LINE = re.compile(r"^process_cpu_seconds_total (\S+)$", re.MULTILINE)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


# --------------------------------------------------------------------------------------------------
# Adapters and texts
# --------------------------------------------------------------------------------------------------


RUNTIMES = ("pytorch", "onnxruntime", "int8")  # int8: the export's model.int8.onnx on ONNX Runtime
RUNTIME_SUFFIX = {"pytorch": "", "onnxruntime": "-onnx", "int8": "-int8"}


def adapter_name(reduction: float, runtime: str = "pytorch") -> str:
    """The served name of the adapter at ``reduction`` on ``runtime``: ``r1``, ``r3-onnx``, ``r2.5-int8``."""
    return f"r{reduction:g}{RUNTIME_SUFFIX[runtime]}"


def model_reference(model: str) -> str:
    """What ``coda_task.json`` records: a bundled name as is, a local directory as an absolute path (the
    server resolves it, so it must not depend on the working directory)."""
    from .assets import BUNDLED_MODELS

    return model if model in BUNDLED_MODELS else str(Path(model).resolve())


def prepare_adapters(
    out_dir: Path, model: str, reductions: tuple[float, ...], labels: list[str], seq_len: int
) -> dict[str, Path]:
    """``{name: directory}`` of one saved classifier per reduction under ``out_dir/adapters``; one already
    there with the same model, reduction, labels and length is reused (building loads the model)."""
    adapters = {}
    for seed, reduction in enumerate(reductions):
        directory = out_dir / "adapters" / adapter_name(reduction)
        if not _adapter_matches(directory, model_reference(model), reduction, labels, seq_len):
            build_random_adapter(directory, model, reduction, labels, seq_len, seed)
        adapters[adapter_name(reduction)] = directory
    return adapters


def _adapter_matches(directory: Path, model: str, reduction: float, labels: list[str], seq_len: int) -> bool:
    from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME

    try:
        task = read_json_object(directory / "coda_task.json")
        config = read_json_object(directory / CONFIG_NAME).get("coda_config", {})
    except ValueError:
        return False
    return (
        (directory / WEIGHTS_NAME).is_file()
        and (task.get("model"), task.get("label_names"), task.get("max_length")) == (model, labels, seq_len)
        and (config.get("reduction"), config.get("pooling")) == (reduction, "mean")
    )


def build_random_adapter(
    directory: Path, model: str, reduction: float, labels: list[str], seq_len: int, seed: int, bottleneck: int = 64
) -> None:
    """Build, randomise and save in a staging directory renamed at the end: a crash leaves no half adapter
    that the next run would reuse. ``bottleneck`` is the adapter width (64, the library's default)."""
    import torch

    from ..config import CodaConfig
    from .classify import build_classifier, save_task

    config = CodaConfig(reduction=reduction, pooling="mean", bottleneck=bottleneck)
    coda, _ = build_classifier(model, config, labels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # adapters start with a zero up-projection: give every trainable weight a value
        for parameter in coda.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * WEIGHT_STD)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    coda.save_pretrained(staging)
    save_task(staging, model_reference(model), labels, max_length=seq_len)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


def prepare_exports(out_dir: Path, adapters: dict[str, Path], runtimes: tuple[str, ...]) -> dict[str, Path]:
    """``{name: path}`` that ``coda serve`` takes for the ONNX Runtime settings: each adapter exported once
    (``coda export --int8``) to ``out_dir/exports/<name>``, reused while it is newer than the adapter's weights
    and has this exporter's graph format."""
    from ..checkpoint import WEIGHTS_NAME
    from .export import GRAPH_FORMAT, REPORT_NAME, export_onnx
    from .onnx_classifier import INT8_NAME, ONNX_NAME

    def current(export: Path, weights: Path) -> bool:
        made = [export / ONNX_NAME, export / INT8_NAME, export / REPORT_NAME]
        if not all(path.is_file() and path.stat().st_mtime > weights.stat().st_mtime for path in made):
            return False
        return json.loads((export / REPORT_NAME).read_text(encoding="utf-8")).get("graph_format") == GRAPH_FORMAT

    served = {}
    for name, directory in adapters.items():
        export = out_dir / "exports" / name
        if not current(export, directory / WEIGHTS_NAME):
            export_onnx(directory, export, quantize_int8=True)
        if "onnxruntime" in runtimes:
            served[name + RUNTIME_SUFFIX["onnxruntime"]] = export
        if "int8" in runtimes:
            served[name + RUNTIME_SUFFIX["int8"]] = export / INT8_NAME
    return served


def request_texts(model: str, seq_len: int, count: int) -> tuple[list[str], list[str]]:
    """``count`` BBC News texts (fixed shuffled order) cut so the tokenizer makes exactly ``seq_len`` tokens
    of each, special tokens included; and the label names. The cut is at a token's end offset in the
    original text, then checked by tokenizing the cut text again (a cut that does not round-trip is skipped)."""
    from transformers import AutoTokenizer

    from .assets import resolve_model_path
    from .data import load_bbc_news

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    body = seq_len - tokenizer.num_special_tokens_to_add(pair=False)
    if body < 1:
        raise ValueError(f"--seq-len must leave room for a text token beside the special tokens, got {seq_len}")
    texts, _, label_names = load_bbc_news()
    cut = []
    for text in random.Random(TEXT_SEED).sample(texts, len(texts)):
        encoded = tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=body, return_offsets_mapping=True
        )
        if len(encoded["input_ids"]) < body:
            continue
        prefix = text[: encoded["offset_mapping"][-1][1]]
        if len(tokenizer(prefix)["input_ids"]) == seq_len:
            cut.append(prefix)
            if len(cut) == count:
                return cut, label_names
    if not cut:
        raise ValueError(f"no BBC News text has {seq_len} tokens; choose a smaller --seq-len")
    return cut, label_names  # fewer distinct texts than asked: requests reuse them in turn


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


def start_server(adapters: dict[str, Path], options: list[str], log: Any) -> tuple[subprocess.Popen, str]:
    """``coda serve`` with every adapter, on 127.0.0.1 and a port free now (another process could take it
    before the server binds: unlikely, and the start then fails cleanly); its output goes to ``log``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "coda_adapters", "serve", "--host", "127.0.0.1", "--port", str(port), *options]
    for name, directory in adapters.items():
        command += ["--adapter", f"{name}={directory}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), f"http://127.0.0.1:{port}"


def wait_until_healthy(url: str, process: subprocess.Popen, deadline: float) -> None:
    """Poll ``/health`` until it answers 200; fail if the server exits or ``deadline`` (monotonic) passes."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ChildProcessError(f"the server exited with code {process.returncode} while starting (see server.log)")
        try:
            with NO_PROXY.open(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused while starting (URLError), or a timeout
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not answer /health in time (see server.log)")


def stop_server(process: subprocess.Popen) -> int:
    """SIGTERM (``coda serve`` drains and exits 0), SIGKILL if it hangs; the exit code. Never raises, as it
    runs in a ``finally`` that may be handling another error."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


# --------------------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one adapter met at one concurrency level, over its measured rounds."""

    latencies: list[float] = field(default_factory=list)  # seconds, answered requests (200) only
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "503", "other" (errors too)
    texts: int = 0  # texts answered with 200
    seconds: float = 0.0  # wall time of the rounds
    server_cpu: float = 0.0  # CPU seconds of the server process during the rounds (its /metrics)
    client_cpu: float = 0.0  # CPU seconds of this process, the load generator, during the rounds
    errors: list[str] = field(default_factory=list)  # the first few non-200 answers, to see why


async def one_request(client: Any, adapter: str, texts: list[str], tally: Tally) -> None:
    import aiohttp

    start = time.perf_counter()
    try:
        async with client.post("/v1/classify", json={"adapter": adapter, "texts": texts}) as response:
            body = await response.text()
        ok = response.status == 200 and len(json.loads(body)["predictions"]) == len(texts)
        status = "200" if ok else "503" if response.status == 503 else "other"
        detail = f"{response.status}: {body[:200]}"
    # ValueError: a 200 body that is not JSON; KeyError, TypeError: JSON that is not an object with predictions
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as error:
        status, detail = "other", f"{type(error).__name__}: {error}"
    tally.statuses[status] += 1
    if status == "200":
        tally.latencies.append(time.perf_counter() - start)
        tally.texts += len(texts)
    elif len(tally.errors) < 3:
        tally.errors.append(detail)


async def closed_loop(client: Any, adapter: str, requests: list[list[str]], concurrency: int, tally: Tally) -> None:
    """Send ``requests`` with ``concurrency`` clients, each sending its next one when the last is answered."""
    pending = iter(requests)  # shared by the clients: one event loop, so next() is never concurrent

    async def client_loop() -> None:
        for texts in pending:
            await one_request(client, adapter, texts, tally)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(requests)))))
    tally.seconds += time.perf_counter() - start


async def metrics_text(client: Any) -> str:
    """The server's ``/metrics`` page."""
    async with client.get("/metrics") as response:
        response.raise_for_status()
        return await response.text()


async def batch_counters(client: Any) -> dict[str, list[float]]:
    """``{adapter: [texts, model calls]}`` so far, from ``/metrics``: the batching the server achieved."""
    counters: dict[str, list[float]] = {}
    for kind, adapter, value in BATCH_SIZE_LINE.findall(await metrics_text(client)):
        counters.setdefault(adapter, [0.0, 0.0])[kind == "count"] = float(value)
    return counters


async def server_cpu_seconds(client: Any) -> float:
    """The server's ``process_cpu_seconds_total`` from ``/metrics``."""
    found = CPU_LINE.search(await metrics_text(client))
    if found is None:
        raise RuntimeError("the server's /metrics has no process_cpu_seconds_total")
    return float(found.group(1))


async def measured_round(client: Any, adapter: str, requests: list[list[str]], concurrency: int, tally: Tally) -> None:
    """:func:`closed_loop`, adding the CPU time the server and this process spent on it to ``tally``."""
    server, own = await server_cpu_seconds(client), time.process_time()
    await closed_loop(client, adapter, requests, concurrency, tally)
    tally.client_cpu += time.process_time() - own
    tally.server_cpu += await server_cpu_seconds(client) - server


async def bounded(work: Any, deadline: float) -> Any:
    """``work`` (a coroutine), cancelled with a ``TimeoutError`` at ``deadline`` (monotonic): the run ends itself."""
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise TimeoutError("the load did not finish within --timeout; the server was stopped") from None


def split_rounds(total: int, rounds: int) -> list[int]:
    """``total`` requests in ``rounds`` nearly equal rounds (no empty round)."""
    rounds = max(1, min(rounds, total))
    return [total // rounds + (i < total % rounds) for i in range(rounds)]


async def run_levels(
    url: str, names: list[str], texts: list[str], settings: dict[str, Any]
) -> dict[tuple[str, int], tuple[Tally, float | None]]:
    """Every concurrency level in turn: a warm-up per adapter, then rounds with the adapter order rotated
    (fewer rounds than asked if a round would have fewer requests than clients).

    Returns ``{(name, concurrency): (Tally, mean texts per model call)}``.
    """
    import aiohttp

    per_request = settings["texts_per_request"]
    requests = [
        [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
        for i in range(settings["requests_per_level"])
    ]
    top = max(settings["concurrency"])
    results: dict[tuple[str, int], tuple[Tally, float | None]] = {}
    # aiohttp, not httpx: with httpx the load generator took 2.1-2.2 ms of CPU per request (the report's "CPU
    # ms/text load gen." column), CPU that the server sharing the machine then did not have
    connector = aiohttp.TCPConnector(limit=top)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        for concurrency in settings["concurrency"]:
            for name in names:  # warm-up: opens the connections, first calls at this batch size
                await closed_loop(client, name, requests[:concurrency], concurrency, Tally())
            tallies = {name: Tally() for name in names}
            before, start = await batch_counters(client), 0
            rounds = min(settings["rounds"], max(1, len(requests) // concurrency))  # every client busy in a round
            for turn, size in enumerate(split_rounds(len(requests), rounds)):
                for name in names[turn % len(names) :] + names[: turn % len(names)]:
                    await measured_round(client, name, requests[start : start + size], concurrency, tallies[name])
                start += size
            after = await batch_counters(client)
            for name, tally in tallies.items():
                texts_done = after[name][0] - before[name][0]
                calls = after[name][1] - before[name][1]
                results[name, concurrency] = (tally, texts_done / calls if calls else None)
    return results


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(
    results: dict[tuple[str, int], tuple[Tally, float | None]],
    reductions: tuple[float, ...],
    concurrency: tuple[int, ...],
    runtimes: tuple[str, ...] = ("pytorch",),
) -> list[dict[str, Any]]:
    """One row per (concurrency, runtime, reduction), with throughput and p99 ratios against r = 1 on PyTorch
    at that concurrency."""
    cells = []
    for c in concurrency:
        for runtime, r in ((runtime, r) for runtime in runtimes for r in reductions):
            tally, batch = results[adapter_name(r, runtime), c]
            ms = [1000 * s for s in tally.latencies]
            cells.append(
                {
                    "reduction": r,
                    "runtime": runtime,
                    "concurrency": c,
                    "adapter": adapter_name(r, runtime),
                    "requests": sum(tally.statuses.values()),
                    "status": {key: tally.statuses[key] for key in ("200", "503", "other")},
                    "errors": tally.errors,
                    "texts": tally.texts,
                    "seconds": tally.seconds,
                    "throughput": tally.texts / tally.seconds if tally.seconds else 0.0,
                    "p50_ms": percentile(ms, 50),
                    "p99_ms": percentile(ms, 99),
                    "mean_batch_size": batch,
                    "server_cpu_ms_per_text": _ratio(1000 * tally.server_cpu, tally.texts),
                    "client_cpu_ms_per_text": _ratio(1000 * tally.client_cpu, tally.texts),
                }
            )
    for cell in cells:
        base = next(
            b
            for b in cells
            if (b["reduction"], b["runtime"], b["concurrency"]) == (BASELINE, "pytorch", cell["concurrency"])
        )
        cell["throughput_vs_r1"] = _ratio(cell["throughput"], base["throughput"])
        cell["p99_vs_r1"] = _ratio(cell["p99_ms"], base["p99_ms"])
    return cells


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


COLUMNS = {  # the table both reports show, one row per (concurrency, runtime, reduction)
    "runtime": lambda cell: cell["runtime"],
    "r": lambda cell: f"{cell['reduction']:g}",
    "clients": lambda cell: str(cell["concurrency"]),
    "requests": lambda cell: str(cell["requests"]),
    "200/503/other": lambda cell: "/".join(str(cell["status"][key]) for key in ("200", "503", "other")),
    "texts/s": lambda cell: f"{cell['throughput']:.1f}",
    "p50": lambda cell: _fmt(cell["p50_ms"], "{:.0f} ms"),
    "p99": lambda cell: _fmt(cell["p99_ms"], "{:.0f} ms"),
    "texts/call": lambda cell: _fmt(cell["mean_batch_size"], "{:.1f}"),
    "CPU ms/text server": lambda cell: _fmt(cell.get("server_cpu_ms_per_text"), "{:.1f}"),
    "CPU ms/text load gen.": lambda cell: _fmt(cell.get("client_cpu_ms_per_text"), "{:.1f}"),
    "texts/s vs r=1 (PyTorch)": lambda cell: _fmt(cell["throughput_vs_r1"], "{:.2f}x"),
    "p99 vs r=1 (PyTorch)": lambda cell: _fmt(cell["p99_vs_r1"], "{:.2f}x"),
}


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[show(cell) for show in COLUMNS.values()] for cell in report["cells"]]


def settings_line(report: dict[str, Any]) -> str:
    threads = report["threads"] if report["threads"] is not None else "torch's default"
    precision = ", PyTorch adapters in bf16" if report.get("quantize", "none") == "bf16" else ""
    return (
        f"{report['model']}, {report['texts_per_request']} text(s) of {report['seq_len']} tokens per request, "
        f"{report['requests_per_level']} requests per adapter and level in {report['rounds']} rounds; "
        f"server: --max-batch-size {report['max_batch_size']}, --max-wait-ms {report['max_wait_ms']:g}, "
        f"threads {threads}{precision}; {report['cpus']} CPUs shared with the load generator; "
        f"server exit code {report['server_exit_code']}, {report['wall_seconds']:.0f} s in all"
    )


def format_load_report(report: dict[str, Any]) -> str:
    """The table for the terminal, columns aligned."""
    rows = [list(COLUMNS), *table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([settings_line(report), *lines])


def format_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Load test of `coda serve`: CoDA adapters on {report['model']}", "", settings_line(report) + ".", ""]
    lines += [report["note"], ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines) + "\n"


def plot_load(report: dict[str, Any], path: Path) -> None:
    """Throughput and p99 latency against concurrency, one line per runtime and reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    reductions = list(dict.fromkeys(cell["reduction"] for cell in report["cells"]))
    for runtime, r in dict.fromkeys((cell["runtime"], cell["reduction"]) for cell in report["cells"]):
        cells = [cell for cell in report["cells"] if (cell["runtime"], cell["reduction"]) == (runtime, r)]
        x = [cell["concurrency"] for cell in cells]
        label = f"r = {r:g}" + ("" if runtime == "pytorch" else f", {runtime}")
        # one colour per reduction, one line style per runtime
        style = dict(linestyle={"pytorch": "-", "onnxruntime": "--", "int8": ":"}[runtime], marker="o", label=label)
        style["color"] = f"C{reductions.index(r)}"
        left.plot(x, [cell["throughput"] for cell in cells], **style)
        right.plot(x, [cell["p99_ms"] or math.nan for cell in cells], **style)
    for axis, label in ((left, "throughput (texts/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"coda serve, {report['model']}, {report['seq_len']} tokens per text", fontsize=10)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


def write_outputs(out_dir: Path, report: dict[str, Any]) -> None:
    write_json(out_dir / "loadtest.json", report)
    markdown = format_markdown(report)
    atomic_write(out_dir / "loadtest.md", lambda temporary: Path(temporary).write_text(markdown, encoding="utf-8"))
    plot_load(report, out_dir / "loadtest.png")


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def check_settings(
    reductions: tuple[float, ...], concurrency: tuple[int, ...], runtimes: tuple[str, ...], numbers: dict[str, Any]
) -> None:
    if "pytorch" not in runtimes or not set(runtimes) <= set(RUNTIMES) or len(set(runtimes)) != len(runtimes):
        raise ValueError(f"--runtimes must be distinct, among {list(RUNTIMES)}, and include pytorch, got {runtimes}")
    if BASELINE not in reductions or any(r < 1 for r in reductions) or len(set(reductions)) != len(reductions):
        raise ValueError(f"--reductions must be distinct, at least 1, and include 1 (the baseline), got {reductions}")
    if not concurrency or any(c < 1 for c in concurrency) or len(set(concurrency)) != len(concurrency):
        raise ValueError(f"--concurrency must be distinct positive integers, got {concurrency}")
    for name, value in numbers.items():
        if value is not None:
            check_number(flag(name), value, above=0)


def run_load_test(
    out_dir: str | Path,
    *,
    model: str = "minilm",
    reductions: tuple[float, ...] = (1, 3, 5),
    concurrency: tuple[int, ...] = (1, 4, 16),
    requests_per_level: int = 256,
    texts_per_request: int = 1,
    seq_len: int = 256,
    threads: int | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 10,
    rounds: int = 4,
    timeout: float = 1800,
    runtimes: tuple[str, ...] = ("pytorch",),
    quantize: str = "none",
) -> dict[str, Any]:
    """Build the adapters, serve them, load the server level by level, stop it; write and return the report.
    ``quantize="bf16"`` serves the PyTorch adapters in bfloat16 (``coda serve --quantize bf16``).

    The run is bounded: a fixed number of requests per adapter and level, and ``timeout`` seconds in all
    (a ``TimeoutError`` then). The server is stopped with SIGTERM whatever happens; an exit code other than
    0 is an error (``ChildProcessError``, an ``OSError``: ``coda`` prints it in one line), raised after the
    report (which records it) is written.
    """
    reductions, concurrency = tuple(float(r) for r in reductions), tuple(int(c) for c in concurrency)
    runtimes = tuple(runtimes)
    settings = dict(locals())  # the parameters as given (normalised above), recorded in the report
    del settings["out_dir"]
    numbers = dict(requests=requests_per_level, texts_per_request=texts_per_request, seq_len=seq_len, rounds=rounds)
    check_settings(reductions, concurrency, runtimes, {**numbers, "threads": threads, "timeout": timeout})
    check_choice(flag("quantize"), quantize, SERVE_QUANTIZE_CHOICES)
    begin = time.monotonic()
    out = output_directory(out_dir)
    texts, labels = request_texts(model, seq_len, min(256, requests_per_level * texts_per_request))
    adapters = prepare_adapters(out, model, reductions, labels, seq_len)
    adapters.update(prepare_exports(out, dict(adapters), runtimes) if len(runtimes) > 1 else {})
    options = ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]
    options += ["--max-queue", str(max(256, max(concurrency) * texts_per_request))]  # measure latency, not refusals
    options += ["--threads", str(threads)] if threads is not None else []
    options += ["--quantize", quantize] if quantize != "none" else []
    with open(out / "server.log", "w", encoding="utf-8") as log:
        process, url = start_server(adapters, options, log)
        try:
            wait_until_healthy(url, process, min(begin + timeout, time.monotonic() + STARTUP_SECONDS))
            results = asyncio.run(bounded(run_levels(url, list(adapters), texts, settings), begin + timeout))
        finally:
            exit_code = stop_server(process)
    report = {**settings, "cpus": os.cpu_count(), "server_exit_code": exit_code, "note": NOTE}
    report.update(wall_seconds=time.monotonic() - begin, cells=summarize(results, reductions, concurrency, runtimes))
    write_outputs(out, report)
    if exit_code != 0:
        raise ChildProcessError(f"the server exited with code {exit_code}, not 0 (see {out / 'server.log'})")
    return report


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_loadtest_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        subparsers,
        "loadtest",
        help="load-test `coda serve` with CoDA adapters at several reductions (throughput, p50/p99 latency)",
        description="Build one adapter per reduction, serve them all from one `coda serve` on loopback, send "
        "real BBC News texts from closed-loop clients at each concurrency, and write loadtest.json, .md and .png.",
    )
    parser.add_argument("--out", default="runs/loadtest", help="output directory (adapters are kept and reused)")
    parser.add_argument("--model", default="minilm", help="bundled model name or local model directory")
    parser.add_argument(
        "--reductions", type=float, nargs="+", default=[1, 3, 5], help="CoDA reductions r (1, the baseline, required)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    parser.add_argument(
        "--runtimes",
        nargs="+",
        default=["pytorch"],
        choices=RUNTIMES,
        help="serve each adapter on these runtimes too (onnxruntime, int8: its `coda export --int8` output)",
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=SERVE_QUANTIZE_CHOICES,
        help="bf16: the server runs the PyTorch adapters in bfloat16 (`coda serve --quantize bf16`)",
    )
    parser.add_argument(
        "--requests",
        dest="requests_per_level",
        metavar="N",
        type=int,
        default=256,
        help="measured requests per adapter and level",
    )
    parser.add_argument("--texts-per-request", type=int, default=1, help="texts in each request")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per text (special tokens included)")
    parser.add_argument("--threads", type=int, help="torch threads in the server (None: torch's choice)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's texts per model call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the server's batching window")
    parser.add_argument("--timeout", type=float, default=1800.0, help="stop the whole run after this many seconds")
    parser.set_defaults(run=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> None:
    options = ("model", "reductions", "concurrency", "requests_per_level", "texts_per_request", "seq_len", "threads")
    options += ("max_batch_size", "max_wait_ms", "timeout", "runtimes", "quantize")
    report = run_load_test(args.out, **{name: getattr(args, name) for name in options})
    print(format_load_report(report))
    print(f"wrote {Path(args.out, 'loadtest.json')}, loadtest.md and loadtest.png")
