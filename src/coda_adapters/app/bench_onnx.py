"""``coda bench --runtime onnxruntime``: CoDA classifiers exported to ONNX, timed on ONNX Runtime beside PyTorch.

For each reduction a classifier with random trainable weights is built and saved as ``coda train`` would
(:func:`.loadtest.build_random_adapter`: the work per call is set by shapes, ``k = ceil(n / r)`` tokens per
routed layer, not by the weights' values), then exported by :func:`.export.export_onnx`, which checks the
graph against PyTorch and refuses a mismatch; with ``quantize="int8"`` also its int8 graph, as
``coda export --int8`` makes it. All of it lives in a temporary directory for the run.

The ONNX Runtime sessions are timed in the same interleaved rounds as the same classifiers in float PyTorch
("coda r=1", "coda r=3", ...), and with ``quantize="int8"`` also in PyTorch's own int8 ("coda int8 r=1", ...;
:func:`.bench.quantize_frozen_linears`), so that the two int8 stacks are compared on one machine in one run:
``speedup_vs_dense`` is against r = 1 of the same runtime and precision, and ``speedup_vs_float_dense`` against
PyTorch's float r = 1, the reference of the target "ONNX Runtime + int8 at r = 3 >= 8x the float PyTorch dense
adapter".

The graphs have dynamic batch and sequence axes and route each padded row with its own ``k`` (from the
attention mask), so the mixed-length batches are timed as in the PyTorch benchmark. Every variant gets only
``input_ids`` and ``attention_mask``, the graph's inputs, so both runtimes compute the same thing.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

from .bench import BenchRow, BenchRun, Variant, quantize_frozen_linears, time_variants
from .bench_models import Batch

LABELS = tuple(f"class {i}" for i in range(5))  # five, as bench_models' training heads; speed does not depend on it
FLOAT_DENSE = Variant("coda", 1).label  # the PyTorch float dense adapter


def benchmark_exports(run: BenchRun, reductions: list[float], batches: dict[tuple[int, bool], Batch]) -> list[BenchRow]:
    """The rows of PyTorch float CoDA classifiers and their ONNX Runtime exports at each reduction, timed
    side by side on ``batches`` (``{(seq_len, mixed): batch}``)."""
    from .onnx_classifier import INPUT_NAMES

    max_length = max(seq_len for seq_len, _ in batches)
    inputs = {key: {name: batch[name] for name in INPUT_NAMES} for key, batch in batches.items()}
    with tempfile.TemporaryDirectory(prefix="coda-bench-onnx-") as root:
        # timed inside the directory's lifetime: the loaded models may still map their weight files
        variants = exported_variants(run, reductions, max_length, Path(root))
        return time_variants(run, variants, inputs, float_dense=FLOAT_DENSE)


def exported_variants(
    run: BenchRun, reductions: list[float], max_length: int, root: Path
) -> dict[str, tuple[Variant, Any]]:
    """``{label: (variant, model or session)}``: the PyTorch float classifiers at every reduction, with int8 the
    PyTorch int8 ones, then their ONNX Runtime sessions, then the int8 sessions (grouped per runtime and
    precision, so the table reads in blocks)."""
    from .classify import load_classifier
    from .onnx_classifier import INT8_NAME, ONNX_NAME, inference_session

    int8 = run.quantize == "int8"
    files = {"onnxruntime": ONNX_NAME} | ({"onnxruntime int8": INT8_NAME} if int8 else {})
    groups: dict[str, dict[str, tuple[Variant, Any]]] = {kind: {} for kind in ("coda", "coda int8", *files)}
    for seed, reduction in enumerate(reductions):
        adapter, export = export_random_classifier(run, reduction, max_length, seed, root)
        variant, model = Variant("coda", reduction), load_classifier(adapter)[0]
        groups["coda"][variant.label] = (variant, model)
        if int8:
            model, variant = copy.deepcopy(model), Variant("coda int8", reduction, precision="int8")
            quantize_frozen_linears(model)
            groups["coda int8"][variant.label] = (variant, model)
        for kind, file in files.items():
            variant = Variant(kind, reduction, precision="int8" if file == INT8_NAME else "float32")
            groups[kind][variant.label] = (variant, inference_session(export / file, run.threads, spinning=False))
    return {label: entry for group in groups.values() for label, entry in group.items()}


def export_random_classifier(
    run: BenchRun, reduction: float, max_length: int, seed: int, root: Path
) -> tuple[Path, Path]:
    """Build a random classifier at ``reduction`` under ``root`` and export it (checked against PyTorch);
    returns ``(classifier directory, export directory)``.

    ``max_length`` is the longest benchmark length, so the export's check runs a text that long. A graph
    that does not reproduce PyTorch becomes a ``ValueError`` naming ``--model``: for the command line it is
    a model this exporter does not handle, not a crash.
    """
    from .export import ExportCheckError, export_onnx
    from .loadtest import adapter_name, build_random_adapter

    print(f"exporting r={reduction:g} ...", file=sys.stderr, flush=True)
    adapter, export = root / "adapters" / adapter_name(reduction), root / "exports" / adapter_name(reduction)
    build_random_adapter(adapter, run.model, reduction, list(LABELS), max_length, seed, bottleneck=run.bottleneck)
    try:
        export_onnx(adapter, export, quantize_int8=run.quantize == "int8")
    except ExportCheckError as error:
        raise ValueError(f"--model {run.model} does not export for --runtime onnxruntime: {error}") from None
    return adapter, export
