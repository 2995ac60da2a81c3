"""``coda serve``: trained classifiers behind an HTTP API (Starlette on uvicorn), with dynamic batching.

- ``POST /v1/classify`` ``{"adapter": NAME, "texts": [...]}`` answers
  ``{"adapter": NAME, "predictions": [{"label": ..., "probabilities": {label: p}}]}``.
- ``GET /health`` answers ``{"status": "ok", "adapters": [...]}``; ``GET /metrics`` the Prometheus text format.
- Errors answer ``{"error": message}``: malformed JSON 400, unknown adapter 404, more than ``--max-body-bytes``
  bytes or more than ``--max-queue`` texts 413, a bad ``texts`` 422, queue full or stopping 503 (with
  ``Retry-After``), a failure in model code 500 (the server keeps serving).

Adapters naming the same base model share one copy of its frozen weights (:mod:`.serving`), and, with
``--mix-adapters`` (the default), those whose shapes allow run in one model call when their requests meet
in a batching window. On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the
requests in flight; the app's shutdown then answers whatever is still queued before the worker thread
stops, and the command exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import SERVE_QUANTIZE_CHOICES

# serving.py imports torch and the model: loaded when a server starts, not whenever `coda` builds its parser
if TYPE_CHECKING:
    from .serving import OnnxServedAdapter, ServedAdapter, ServeSettings

logger = logging.getLogger("coda.serve")

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RETRY_AFTER_SECONDS = "1"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve trained classifiers over HTTP, with dynamic batching")
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a `coda train` output served as NAME (repeat for several; same base model = shared weights), or a "
        "`coda export` output (or its model.int8.onnx) served with ONNX Runtime",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="texts per model call")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others")
    parser.add_argument("--max-queue", type=int, default=256, help="texts waiting at most; more answer 503")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies answer 413")
    parser.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    parser.add_argument(
        "--mix-adapters",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the requests of adapters that share a base model and shapes in one model call (same answers); "
        "--no-mix-adapters: one model call per adapter",
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=SERVE_QUANTIZE_CHOICES,
        help="bf16: every PyTorch adapter's weights in bfloat16 (fast on CPUs with AMX or AVX512-BF16; routers "
        "still select in float32); for int8, serve a `coda export --int8` output",
    )
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from .serving import ServeSettings

    settings = ServeSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        threads=args.threads,
        mix_adapters=args.mix_adapters,
        quantize=args.quantize,
    )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    adapters = parse_adapter_options(args.adapter)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # uvicorn's style
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    app = build_app(adapters, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="on", timeout_graceful_shutdown=None)
    with signals_end_cleanly():
        uvicorn.Server(config).run()


def parse_adapter_options(options: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` options as ``{NAME: DIR}``; names are plain (letters, digits, ``_.-``) and unique."""
    adapters: dict[str, Path] = {}
    for option in options:
        name, sep, directory = option.partition("=")
        if not sep or not directory:
            raise ValueError(f"--adapter must be NAME=DIR, got {option!r}")
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"--adapter name {name!r} must be letters, digits, '_', '.' or '-'")
        if name in adapters:
            raise ValueError(f"--adapter name {name!r} is given twice")
        adapters[name] = Path(directory)
    return adapters


@contextmanager
def signals_end_cleanly() -> Iterator[None]:
    """Let SIGTERM and SIGINT end the process with exit code 0 after uvicorn's graceful shutdown.

    uvicorn catches the signal, drains, and then raises it again with the handler it found: with the
    default handlers the drained process would still die of SIGTERM (exit -15) or KeyboardInterrupt.
    A handler that does nothing is installed only around the server, so a signal during model
    loading still stops the command at once.
    """
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore(sig: int, frame: Any) -> None:
    logger.info("stopped on signal %d", sig)


# --------------------------------------------------------------------------------------------------
# The ASGI app
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, with its message (and headers, for 503's Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class Service:
    """What the routes share: the adapters, the batcher and the metrics."""

    def __init__(self, adapters: Mapping[str, ServedAdapter | OnnxServedAdapter], settings: ServeSettings) -> None:
        from .serving import Batcher, Metrics

        self.adapters = dict(adapters)
        self.settings = settings
        self.metrics = Metrics(list(self.adapters), settings.max_batch_size)
        self.batcher = Batcher(self.adapters, settings, self.metrics)


def build_app(adapters: Mapping[str, str | Path], settings: ServeSettings | None = None) -> Any:
    """A Starlette app serving the classifiers ``{name: coda train output}``; loads them now.

    The batching loop starts with the app (ASGI lifespan) and stops after answering what is queued.
    ``app.state.service`` holds the loaded adapters, the batcher and the metrics.
    """
    from .serving import ServeSettings, load_adapters

    settings = settings or ServeSettings()
    return app_for(Service(load_adapters(adapters, threads=settings.threads, quantize=settings.quantize), settings))


def app_for(service: Service) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route

    @asynccontextmanager
    async def lifespan(app: Starlette):
        service.batcher.start()
        yield
        await service.batcher.close()

    async def classify(request: Any) -> Any:
        return await classify_endpoint(service, request)

    async def health(request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "adapters": list(service.adapters)})

    async def metrics(request: Any) -> Any:
        from starlette.responses import Response

        text = service.metrics.render(service.batcher.pending)
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    routes = [
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


async def classify_endpoint(service: Service, request: Any) -> Any:
    """Answer one classification request, whatever happens, and count it."""
    from starlette.responses import JSONResponse

    from .serving import ModelError

    start = time.perf_counter()
    adapter, status, headers = "", 200, None
    try:
        document = await read_json(request, service.settings.max_body_bytes)
        adapter = requested_adapter(document, service)
        body = await predict(service, adapter, requested_texts(document, service.settings.max_queue))
    except ApiError as error:
        status, headers, body = error.status, error.headers, {"error": str(error)}
    except ModelError as error:  # already logged with its traceback by the worker
        status, body = 500, {"error": f"the model failed: {error}"}
    except Exception as error:  # a bug here: answer, log, keep serving
        logger.exception("request failed")
        status, body = 500, {"error": f"internal error: {type(error).__name__}"}
    service.metrics.requests[adapter, status] += 1
    if adapter:
        service.metrics.latency[adapter].observe(time.perf_counter() - start)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Any, limit: int) -> Any:
    """The request body parsed as JSON; over ``limit`` bytes is 413, before reading it all if declared."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body has {declared} bytes; at most {limit} (--max-body-bytes)")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body has more than {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody to answer, but count it and do not log a traceback
        raise ApiError(400, "the client disconnected while sending the body") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise ApiError(400, f"the body is not valid JSON: {str(error)[:200]}") from None


def requested_adapter(document: Any, service: Service) -> str:
    """The served adapter ``{"adapter": NAME, ...}`` names, or the ApiError to answer."""
    if not isinstance(document, dict):
        raise ApiError(422, 'the body must be a JSON object {"adapter": NAME, "texts": [...]}')
    adapter = document.get("adapter")
    if not isinstance(adapter, str):
        raise ApiError(422, f'"adapter" must be the name of a served adapter: {list(service.adapters)}')
    if adapter not in service.adapters:
        raise ApiError(404, f"unknown adapter {adapter[:100]!r}; served: {list(service.adapters)}")
    return adapter


def requested_texts(document: dict[str, Any], max_texts: int) -> list[str]:
    """The non-empty list of non-blank strings ``"texts"`` must be, or the ApiError to answer."""
    texts = document.get("texts")
    if not isinstance(texts, list) or not texts:
        raise ApiError(422, '"texts" must be a non-empty list of strings')
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(422, f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ApiError(422, f"texts[{i}] is empty; there is nothing to classify")
    if len(texts) > max_texts:
        raise ApiError(413, f"{len(texts)} texts in one request; at most {max_texts} (--max-queue)")
    return texts


async def predict(service: Service, adapter: str, texts: list[str]) -> dict[str, Any]:
    from .serving import QueueFull

    try:
        future = service.batcher.submit(adapter, texts)
    except QueueFull as error:
        raise ApiError(503, str(error), {"Retry-After": RETRY_AFTER_SECONDS}) from None
    probabilities = await future
    names = service.adapters[adapter].label_names
    return {"adapter": adapter, "predictions": [prediction(row, names) for row in probabilities.tolist()]}


def prediction(row: list[float], names: list[str]) -> dict[str, Any]:
    """The most probable label and every label's probability (non-finite values are a model failure: 500)."""
    if not all(math.isfinite(p) for p in row):
        raise ApiError(500, "the model produced non-finite probabilities")
    best = max(range(len(row)), key=row.__getitem__)
    return {"label": names[best], "probabilities": dict(zip(names, row, strict=True))}
