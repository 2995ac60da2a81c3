"""Speed benchmarks: CoDA against the dense parallel adapter, the frozen model and merged LoRA.

Every setting is timed side by side in one process, with the settings interleaved across repeats so
that machine noise hits all of them alike; the report gives medians and ratios, never a single time.
With ``runtime="onnxruntime"`` the CoDA classifiers are exported and timed on ONNX Runtime beside their
PyTorch selves (:mod:`.bench_onnx`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import CodaConfig, get_coda_model, soft_topk
from ..bindings import binding_for
from ..config import check_choice, check_int, check_number
from ..files import write_json
from .bench_models import RANDOM_MODELS, Batch, bench_model
from .options import flag
from .progress import progress_bar

QUANTIZE_CHOICES = ("none", "int8", "bf16")
RUNTIME_CHOICES = ("pytorch", "onnxruntime")
# kinds labelled with their r, each with its own dense reference (its r = 1): PyTorch CoDA and the exports
ROUTED_KINDS = ("coda", "coda int8", "onnxruntime", "onnxruntime int8")
ADAPTER_KINDS = (*ROUTED_KINDS, "float dense")  # the kinds with a bottleneck adapter, for the cost model


# --------------------------------------------------------------------------------------------------
# Cost model (method §6)
# --------------------------------------------------------------------------------------------------


def layer_dimensions(config: Any) -> tuple[int, int, int, int]:
    """``(hidden, attention inner dim, key/value dim, feed-forward multiply-adds per token)`` of a layer,
    from any family's config (BERT-style, T5's ``d_kv``/``d_ff``, grouped-query attention, gated MLPs)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    f = getattr(config, "intermediate_size", None) or config.d_ff
    gated = config.model_type == "llama" or getattr(config, "is_gated_act", False)
    return d, heads * head_dim, kv_heads * head_dim, (3 if gated else 2) * d * f


def layer_flops(config: Any, n: int, k: int | None, bottleneck: int | None) -> float:
    """Multiply-add FLOPs of one Transformer layer on one example padded to ``n`` tokens.

    ``k = None`` is a dense layer (it computes every position, padding included); otherwise the frozen
    layer runs on ``k`` tokens and the router (a dot product per token) and the soft top-k (about ten
    operations per token) run on all ``n``; a routed decoder LM also projects every token's key and
    value for the cache. ``bottleneck`` adds a bottleneck adapter on all ``n``.
    """
    d, inner, kv, mlp = layer_dimensions(config)
    tokens = n if k is None else k
    flops = 2 * tokens * (2 * d * inner + 2 * d * kv + mlp) + 4 * tokens * tokens * inner
    if k is not None:
        flops += 2 * n * d + 10 * n
        if config.model_type == "llama":
            flops += 2 * (n - k) * 2 * d * kv
    if bottleneck:
        flops += 4 * n * d * bottleneck
    return float(flops)


def flop_ratio(
    config: Any, padded_length: int, lengths: list[int], reduction: float | None, bottleneck: int | None
) -> float:
    """Cost-model speed-up over the dense parallel adapter for a batch of ``lengths`` padded to ``padded_length``.

    ``reduction = None`` with ``bottleneck = None`` is the frozen model (no adapter, no routing). The
    dense models compute every padded position; CoDA's ``k`` comes from the real lengths.
    """
    n = padded_length
    dense = len(lengths) * layer_flops(config, n, None, bottleneck or 64)
    if reduction is None or reduction == 1:
        this = len(lengths) * layer_flops(config, n, None, bottleneck)
    else:
        this = sum(layer_flops(config, n, math.ceil(length / reduction), bottleneck) for length in lengths)
    return dense / this


# --------------------------------------------------------------------------------------------------
# Models under test
# --------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One model under test: ``kind`` is "coda" (with ``reduction``), "frozen", "lora-merged", "lora" (training),
    "float dense" (the unquantised dense parallel adapter, the reference of an int8 run), "onnxruntime" and
    "onnxruntime int8" (a CoDA classifier's ONNX export, float or int8, on ONNX Runtime, with ``reduction``), or
    "coda int8" (the same classifier in PyTorch, int8 as ``--quantize int8`` makes it: the export's peer).
    ``precision`` is what its frozen layers compute in: "float32", "int8" or "bf16"."""

    kind: str
    reduction: float | None = None
    precision: str = "float32"

    @property
    def label(self) -> str:
        return f"{self.kind} r={self.reduction:g}" if self.kind in ROUTED_KINDS else self.kind

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.kind.startswith("onnxruntime") else "pytorch"

    @property
    def dense_label(self) -> str:
        """The variant ``speedup_vs_dense`` is against: r = 1 of the same kind (runtime and precision), so that
        an export's speed-up is its routing's alone; the PyTorch dense adapter for the baselines."""
        return Variant(self.kind if self.kind in ROUTED_KINDS else "coda", 1).label


def build_variants(
    base: nn.Module,
    reductions: list[float],
    bottleneck: int,
    quantize: str,
    train: bool,
    coda_fields: Callable[[float], dict[str, Any]] | None = None,
) -> dict[str, tuple[Variant, nn.Module]]:
    """Copies of ``base`` as the frozen model, merged LoRA and CoDA at each reduction (with ``coda_fields(r)``)."""
    variants: dict[str, tuple[Variant, nn.Module]] = {}
    if not train:
        variants["frozen"] = (Variant("frozen"), copy.deepcopy(base))
    variants["lora-merged" if not train else "lora"] = (
        Variant("lora-merged" if not train else "lora"),
        lora_model(base, merge=not train),
    )
    for r in reductions:
        fields = coda_fields(r) if coda_fields is not None and r > 1 else {}
        model = get_coda_model(copy.deepcopy(base), CodaConfig(reduction=r, bottleneck=bottleneck, **fields))
        variants[Variant("coda", r).label] = (Variant("coda", r), model)
    if quantize != "none":
        for label, (variant, model) in variants.items():
            lower_precision(model, quantize)
            variants[label] = (replace(variant, precision=quantize), model)
        dense = get_coda_model(copy.deepcopy(base), CodaConfig(reduction=1, bottleneck=bottleneck))
        variants["float dense"] = (Variant("float dense", 1), dense)
    return variants


def lora_model(base: nn.Module, merge: bool) -> nn.Module:
    """peft LoRA (rank 8 on the query and value projections) on a copy of ``base``; merged for inference."""
    from peft import LoraConfig, get_peft_model

    targets = list(binding_for(base).default_lora_targets)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    return model.merge_and_unload() if merge else model


def lower_precision(model: nn.Module, quantize: str) -> None:
    """``model`` in the precision ``--quantize`` names (in place): ``int8``, the frozen layers' linear layers
    dynamically quantised (:func:`quantize_frozen_linears`); ``bf16``, every weight in bfloat16, which CPUs with
    AMX or AVX512-BF16 multiply several times faster than float32 (the routers still score and select in
    float32); ``none``, unchanged."""
    check_choice(flag("quantize"), quantize, QUANTIZE_CHOICES)
    if quantize == "int8":
        quantize_frozen_linears(model)
    elif quantize == "bf16":
        model.to(torch.bfloat16)


def quantize_frozen_linears(model: nn.Module) -> None:
    """int8 dynamic quantisation of every frozen ``nn.Linear`` inside the Transformer layers (in place).

    Trainable modules (adapters, routers, heads) stay in float32.
    """
    from torch.ao.quantization import quantize_dynamic

    layers = _layer_list(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks the quantised tensor API as deprecated
        for index in range(len(layers)):
            layer = layers[index]
            frozen = getattr(layer, "layer", layer)  # a ConditionalLayer wraps the frozen layer
            quantized = quantize_dynamic(frozen, {nn.Linear}, dtype=torch.qint8)
            if frozen is layer:
                layers[index] = quantized
            else:
                layer.layer = quantized


def _layer_list(model: nn.Module) -> nn.ModuleList:
    return binding_for(getattr(model, "model", model)).layers()


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def inference_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(**batch)

    return step


def training_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward + backward + AdamW step with a classification loss on random labels."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = next(value for value in batch.values() if isinstance(value, torch.Tensor)).shape[0]
    labels = torch.randint(0, model.config.num_labels, (size,))
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()

    return step


def peak_memory_mb(step: Callable[[], None]) -> float:
    """Peak of the memory allocated during ``step`` above what was allocated before, in MB.

    Read from torch.profiler's allocation events; transient allocations inside one operator are not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Silence the profiler backend's own log lines, which it writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def time_interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, warm_calls: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each step; one timed call of every step per round, in a rotating order.

    By default a timed call follows another step's call, which leaves the caches (and any threads still
    spinning) in that step's state: fair between steps, but colder than a process that runs one model over
    and over. ``warm_calls`` untimed calls of the same step right before each timed one measure that warm
    case instead, still interleaved against the machine's drift.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in progress_bar(range(repeats), desc="timing", unit="round", leave=False):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(warm_calls):
                steps[name]()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """One variant at one batch shape. ``runtime`` is "pytorch" or "onnxruntime"; ``peak_mem_mb`` is None on
    ONNX Runtime, whose allocations torch's profiler does not see."""

    model: str
    variant: str
    seq_len: int
    batch_size: int
    mixed_lengths: bool
    reduction: float | None
    latency_ms: float
    examples_per_s: float
    speedup_vs_dense: float
    speedup_vs_frozen: float | None
    speedup_vs_lora_merged: float | None
    speedup_vs_float_dense: float | None
    flop_ratio: float
    efficiency: float
    peak_mem_mb: float | None
    train: bool
    quantize: str
    threads: int
    runtime: str = "pytorch"
    warm_calls: int = 0  # untimed calls of the variant right before each timed one (coda bench --warm-calls)
    # what this row's frozen layers computed in ("float32", "int8", "bf16"); ``quantize`` is the run's flag, which
    # in a PyTorch run lowers every row but "float dense" and in an ONNX run adds int8 rows beside the float ones
    precision: str = "float32"


@dataclass(frozen=True)
class BenchRun:
    """The settings every row of one run shares."""

    model: str
    config: Any
    batch_size: int
    bottleneck: int
    repeats: int
    warmup: int
    train: bool
    quantize: str
    threads: int
    warm_calls: int = 0  # untimed calls of a variant right before each of its timed calls (time_interleaved)


def run_benchmark(
    *,
    model_name: str,
    seq_lens: list[int],
    reductions: list[float],
    batch_size: int = 8,
    threads: int = 2,
    repeats: int = 10,
    warmup: int = 2,
    train: bool = False,
    quantize: str = "none",
    mixed: bool = True,
    bottleneck: int = 64,
    profile: bool = False,
    runtime: str = "pytorch",
    coda_fields: Callable[[float], dict[str, Any]] | None = None,
    warm_calls: int = 0,
) -> list[BenchRow]:
    """Time CoDA at each reduction against its baselines; see :class:`BenchRow` for what is reported.

    ``reductions`` must contain 1 (the dense parallel adapter every speed-up is relative to). With
    ``profile``, also print where each variant's time goes at the longest sequence length. With
    ``runtime="onnxruntime"``, time the ONNX exports of CoDA classifiers at each reduction beside the same
    classifiers in float PyTorch (:func:`.bench_onnx.benchmark_exports`); ``quantize="int8"`` then adds the
    int8 graphs and leaves PyTorch in float. ``threads`` applies to torch and ONNX Runtime alike.
    ``coda_fields(r)`` gives more :class:`CodaConfig` fields of the CoDA variant at ``r`` (a routing recipe).
    ``warm_calls``: untimed calls of each variant right before each of its timed ones (see :func:`time_interleaved`).
    """
    validate_runtime(runtime, model_name, train, profile, quantize)
    spec = bench_model(model_name)
    config = spec.config
    validate_bench_arguments(config, seq_lens, reductions, batch_size, threads, repeats, quantize, warm_calls)
    torch.set_num_threads(threads)
    if mixed and not spec.supports_mixed:
        print(f"note: {model_name} inputs all have the same length; no mixed-length batches", file=sys.stderr)
        mixed = False
    batches = {(n, False): spec.batch(n, batch_size, False) for n in seq_lens}
    if mixed:
        batches.update({(n, True): spec.batch(n, batch_size, True) for n in seq_lens})
    run = BenchRun(model_name, config, batch_size, bottleneck, repeats, warmup, train, quantize, threads, warm_calls)
    if runtime == "onnxruntime":
        from .bench_onnx import benchmark_exports

        return benchmark_exports(run, reductions, batches)
    variants = build_variants(spec.load(train), reductions, bottleneck, quantize, train, coda_fields)
    rows = time_variants(run, variants, batches, float_dense="float dense")
    if profile:
        batch = batches[(max(seq_lens), False)]
        for name, (variant, model) in variants.items():
            print(f"\n== where the time goes: {name}, {max(seq_lens)} tokens ==")
            print(profile_table(variant_step(variant, model, batch, train)))
    return rows


def time_variants(
    run: BenchRun, variants: dict[str, tuple[Variant, Any]], batches: dict[tuple[int, bool], Batch], float_dense: str
) -> list[BenchRow]:
    """Time every variant on each ``(seq_len, mixed)`` batch, interleaved, and report a row for each.

    ``variants`` maps each label to the variant and what runs it (a PyTorch model or an ONNX Runtime
    session); ``float_dense`` names the variant ``speedup_vs_float_dense`` is against (None where absent).
    """
    rows = []
    for (seq_len, is_mixed), batch in batches.items():
        steps = {name: variant_step(variant, runner, batch, run.train) for name, (variant, runner) in variants.items()}
        times = time_interleaved(steps, run.repeats, run.warmup, run.warm_calls)
        medians = {name: statistics.median(t) for name, t in times.items()}
        lengths = batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch else [seq_len] * run.batch_size
        for name, (variant, _) in variants.items():
            rows.append(bench_row(run, variant, (seq_len, is_mixed, lengths), medians, float_dense, steps[name]))
    return rows


def variant_step(variant: Variant, runner: Any, batch: Batch, train: bool) -> Callable[[], None]:
    """One timed call: ``runner`` is an ONNX Runtime session for an export, else a PyTorch model (a training
    step with ``train``)."""
    if variant.runtime == "onnxruntime":
        from .onnx_classifier import onnx_step

        return onnx_step(runner, batch)
    return (training_step if train else inference_step)(runner, batch)


def bench_row(
    run: BenchRun,
    variant: Variant,
    shape: tuple[int, bool, list[int]],
    medians: dict[str, float],
    float_dense: str,
    step: Callable[[], None],
) -> BenchRow:
    """The row of ``variant`` from the medians of every variant timed with it on one batch; ``shape`` is
    ``(padded length, mixed, each example's length)``."""
    seq_len, is_mixed, lengths = shape
    name = variant.label
    adapter = run.bottleneck if variant.kind in ADAPTER_KINDS else None
    ratio = flop_ratio(run.config, seq_len, lengths, variant.reduction, adapter)
    speedup = medians[variant.dense_label] / medians[name]
    return BenchRow(
        model=run.model,
        variant=name,
        seq_len=seq_len,
        batch_size=run.batch_size,
        mixed_lengths=is_mixed,
        reduction=variant.reduction,
        latency_ms=1e3 * medians[name],
        examples_per_s=run.batch_size / medians[name],
        speedup_vs_dense=speedup,
        speedup_vs_frozen=_speedup(medians, "frozen", name),
        speedup_vs_lora_merged=_speedup(medians, "lora-merged", name),
        speedup_vs_float_dense=_speedup(medians, float_dense, name),
        flop_ratio=ratio,
        efficiency=speedup / ratio,
        peak_mem_mb=peak_memory_mb(step) if variant.runtime == "pytorch" else None,
        train=run.train,
        quantize=run.quantize,
        threads=run.threads,
        runtime=variant.runtime,
        warm_calls=run.warm_calls,
        precision=variant.precision,
    )


def _speedup(medians: dict[str, float], reference: str, name: str) -> float | None:
    """How many times faster ``name`` ran than ``reference``; None if ``reference`` was not timed."""
    return medians[reference] / medians[name] if reference in medians else None


def profile_table(step: Callable[[], None], rows: int = 12) -> str:
    """torch.profiler's operators by self CPU time over three calls of ``step`` (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


def validate_runtime(runtime: str, model_name: str, train: bool, profile: bool, quantize: str = "none") -> None:
    """``--runtime onnxruntime`` times exported inference graphs of the classifiers ``coda export`` takes
    (made by ``build_classifier``: a bundled text model or a local model directory); clear errors otherwise."""
    check_choice(flag("runtime"), runtime, RUNTIME_CHOICES)
    if runtime == "pytorch":
        return
    if quantize == "bf16":
        raise ValueError(
            "--quantize bf16 cannot be combined with --runtime onnxruntime: the exports are float32 or int8 "
            "(--quantize int8); time bfloat16 with --runtime pytorch"
        )
    if train:
        raise ValueError(
            "--train cannot be combined with --runtime onnxruntime: an exported graph runs inference only "
            "(time training steps with --runtime pytorch --train)"
        )
    if profile:
        raise ValueError(
            "--profile cannot be combined with --runtime onnxruntime: torch.profiler does not see inside "
            "ONNX Runtime (profile with --runtime pytorch)"
        )
    if model_name in RANDOM_MODELS:
        from .assets import BUNDLED_MODELS

        raise ValueError(
            f"--model {model_name} cannot be exported: --runtime onnxruntime exports text classifiers as "
            f"`coda export` does, over a bundled model ({', '.join(BUNDLED_MODELS)}) or a local Hugging Face "
            f"model directory; the random-weight models ({', '.join(RANDOM_MODELS)}) run with --runtime pytorch"
        )


def validate_bench_arguments(
    config: Any,
    seq_lens: list[int],
    reductions: list[float],
    batch_size: int,
    threads: int,
    repeats: int,
    quantize: str,
    warm_calls: int = 0,
) -> None:
    """Clear errors before any work starts."""
    max_positions = getattr(config, "max_position_embeddings", None)
    if not seq_lens or any(n < 1 for n in seq_lens):
        raise ValueError(f"--seq-lens must be positive token counts, got {seq_lens}")
    if max_positions is not None and max(seq_lens) > max_positions:
        raise ValueError(f"--seq-lens {max(seq_lens)} is above the model's maximum of {max_positions} positions")
    if 1 not in reductions:
        raise ValueError(
            f"--reductions must include 1, the dense parallel adapter that speed-ups refer to; got {reductions}"
        )
    for r in reductions:
        check_number("--reductions", r, low=1)
    for name, value in (("batch_size", batch_size), ("threads", threads), ("repeats", repeats)):
        check_int(flag(name), value, low=1)
    check_int(flag("warm_calls"), warm_calls, low=0)
    check_choice(flag("quantize"), quantize, QUANTIZE_CHOICES)


def format_table(rows: list[BenchRow]) -> str:
    columns = [
        ("variant", max([12, *(len(row.variant) for row in rows)]), lambda r: r.variant),
        ("seq", 5, lambda r: r.seq_len),
        ("mixed", 5, lambda r: "yes" if r.mixed_lengths else "no"),
        ("ms", 8, lambda r: f"{r.latency_ms:.1f}"),
        ("ex/s", 7, lambda r: f"{r.examples_per_s:.1f}"),
        ("vs dense", 8, lambda r: _ratio(r.speedup_vs_dense)),
        ("vs frozen", 9, lambda r: _ratio(r.speedup_vs_frozen)),
        ("vs LoRA", 7, lambda r: _ratio(r.speedup_vs_lora_merged)),
        ("vs float", 8, lambda r: _ratio(r.speedup_vs_float_dense)),
        ("FLOP ratio", 10, lambda r: _ratio(r.flop_ratio)),
        ("eff.", 5, lambda r: f"{r.efficiency:.2f}"),
        ("peak MB", 8, lambda r: "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"),
    ]
    header = " ".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width, _) in enumerate(columns))
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [str(value(row)) for _, _, value in columns]
        lines.append(
            " ".join(
                f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, columns, strict=True))
            )
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_bench_json(rows: list[BenchRow], path: str | Path) -> None:
    write_json(path, [asdict(row) for row in rows])


def plot_speedups(rows: list[BenchRow], path: str | Path) -> None:
    """Measured speed-up over the dense parallel adapter against sequence length, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    full = [row for row in rows if not row.mixed_lengths]
    for variant in dict.fromkeys(row.variant for row in full):
        points = [(row.seq_len, row.speedup_vs_dense, row.flop_ratio) for row in full if row.variant == variant]
        (line,) = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{variant} (measured)")
        if variant.startswith("coda") and variant != "coda r=1":
            axis.plot(
                [p[0] for p in points],
                [p[2] for p in points],
                linestyle="--",
                color=line.get_color(),
                label=f"{variant} (cost model)",
            )
    axis.set_xlabel("sequence length (tokens)")
    axis.set_ylabel("speed-up over the dense parallel adapter")
    axis.set_title(
        f"{rows[0].model}, batch {rows[0].batch_size}, {rows[0].threads} threads"
        + (", training" if rows[0].train else ", inference")
    )
    axis.set_xscale("log", base=2)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Soft top-k: exactness and cost
# --------------------------------------------------------------------------------------------------


def bisection_soft_topk(scores: torch.Tensor, k: int, epsilon: float, steps: int = 100) -> torch.Tensor:
    """Reference λ in float64: bisection on the threshold τ of ``λ = min(1, exp((s - τ)/ε))``."""
    s = scores.double()
    low = s.min(-1, keepdim=True).values - 60 * epsilon - 1
    high = s.max(-1, keepdim=True).values + 60 * epsilon + 1
    for _ in range(steps):
        tau = (low + high) / 2
        too_much = torch.clamp(torch.exp((s - tau) / epsilon), max=1).sum(-1, keepdim=True) > k
        low, high = torch.where(too_much, tau, low), torch.where(too_much, high, tau)
    return torch.clamp(torch.exp((s - (low + high) / 2) / epsilon), max=1)


def soft_topk_report(
    n: int = 512,
    batch: int = 8,
    k: int = 171,
    epsilons: tuple[float, ...] = (1e-3, 0.01, 0.03, 0.1, 1.0, 10.0),
    repeats: int = 200,
    threads: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Largest error against a float64 bisection and the time per call, exact vs the paper's 20-step solver."""
    torch.set_num_threads(threads)
    scores = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))
    errors = []
    for eps in epsilons:
        reference = bisection_soft_topk(scores, k, eps)
        row = {"epsilon": eps}
        for method in ("exact", "coordinate_descent"):
            lam = soft_topk(scores, k, epsilon=eps, method=method).double()
            row[f"{method}_max_error"] = float((lam - reference).abs().max())
            row[f"{method}_min_row_sum"] = float(lam.sum(-1).min())
        errors.append(row)

    def call(method: str, backward: bool) -> Callable[[], None]:
        leaf = scores.clone().requires_grad_(backward)

        def step() -> None:
            lam = soft_topk(leaf, k, epsilon=0.03, method=method)
            if backward:
                lam.sum().backward()

        return step

    steps = {
        f"{m}{' +backward' if b else ''}": call(m, b) for m in ("exact", "coordinate_descent") for b in (False, True)
    }
    times = {name: statistics.median(t) * 1e6 for name, t in time_interleaved(steps, repeats, warmup=10).items()}
    return {
        "n": n,
        "batch": batch,
        "k": k,
        "errors": errors,
        "microseconds": times,
        "cost_ratio_exact_over_cd": times["exact"] / times["coordinate_descent"],
        "cost_ratio_exact_over_cd_with_backward": times["exact +backward"] / times["coordinate_descent +backward"],
    }


def format_soft_topk_report(report: dict[str, Any]) -> str:
    """The report of :func:`soft_topk_report` as a few lines of text."""
    lines = [
        f"n = {report['n']}, k = {report['k']}, batch = {report['batch']}; scores ~ N(0, 1)",
        f"{'epsilon':>8} {'exact max err':>14} {'CD max err':>11} {'exact min sum':>14} {'CD min sum':>11}",
    ]
    for row in report["errors"]:
        lines.append(
            f"{row['epsilon']:>8g} {row['exact_max_error']:>14.2e} {row['coordinate_descent_max_error']:>11.2e} "
            f"{row['exact_min_row_sum']:>14.3f} {row['coordinate_descent_min_row_sum']:>11.3f}"
        )
    lines += [f"{name:<30} {micros:8.1f} us per call (epsilon 0.03)" for name, micros in report["microseconds"].items()]
    lines.append(
        f"cost exact / coordinate descent (20 steps): {report['cost_ratio_exact_over_cd']:.2f} forward, "
        f"{report['cost_ratio_exact_over_cd_with_backward']:.2f} forward+backward"
    )
    return "\n".join(lines)
