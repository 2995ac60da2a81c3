"""The results table: every baseline and CoDA variant trained with one recipe, then timed side by side.

``coda experiment --preset results`` reproduces the README's table (``make results``);
``--preset demo`` is the short version that ``make demo`` runs. Each row's outputs go to
``OUT/<row>/``; a row whose ``metrics.json`` exists is not trained again, so an interrupted run
picks up where it stopped.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CodaConfig
from ..files import write_json
from .classify import (
    METRICS_NAME,
    TrainConfig,
    build_classifier,
    load_backbone_adapter,
    load_classifier,
    train_classifier,
)
from .data import ClassificationData, subsample
from .pretrain import PretrainConfig, build_pretraining_model, pretrain


@dataclass
class Row:
    """One line of the table: a CoDA configuration, with or without CoDA pretraining first."""

    name: str
    coda: dict[str, Any]
    pretrain: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig settings that differ for this row

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Preset:
    rows: list[Row]
    train: TrainConfig
    pretrain: PretrainConfig
    max_train_examples: int | None = None
    speed_batch: int = 8
    speed_repeats: int = 10
    base: dict[str, Any] = field(default_factory=dict)  # CodaConfig settings shared by all rows


DENSE = "Dense parallel adapter (r=1)"

PRESETS = {
    "results": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("Series adapter (r=1)", {"reduction": 1, "adapter": "series"}),
            # LoRA at its usual, higher learning rate (the one the offline-assets scout used)
            Row("LoRA (peft, rank 8)", {"reduction": 1, "adapter": "none", "lora_rank": 8}, train={"lr": 2e-3}),
            Row("CoDA r=3", {"reduction": 3}),
            Row("CoDA r=3 + pretraining", {"reduction": 3}, pretrain=True),
            Row("CoDA r=5", {"reduction": 5}),
            Row("CoDA r=5 + pretraining", {"reduction": 5}, pretrain=True),
            Row("CoDA r=3, random router", {"reduction": 3, "router": "random"}),
            Row(
                "CoDA r=3, coordinate-descent soft top-k",
                {"reduction": 3, "soft_topk_method": "coordinate_descent", "epsilon": 0.03},
            ),
        ],
        train=TrainConfig(epochs=3, batch_size=16, lr=1e-3, max_length=256),
        # routers only: distilling with the adapters too shrank the features and cost accuracy (README)
        pretrain=PretrainConfig(steps=200, batch_size=16, lr=1e-3, max_length=256, routers_only=True),
    ),
    "demo": Preset(
        rows=[Row(DENSE, {"reduction": 1}), Row("CoDA r=3 + pretraining", {"reduction": 3}, pretrain=True)],
        train=TrainConfig(epochs=3, batch_size=16, lr=1e-3, max_length=128),
        pretrain=PretrainConfig(steps=40, batch_size=16, lr=1e-3, max_length=128, routers_only=True),
        max_train_examples=800,
    ),
    # MPNet-base (run with --model mpnet): a subset and one epoch keep it under 10 minutes on 2 cores
    "mpnet": Preset(
        rows=[Row(DENSE, {"reduction": 1}), Row("CoDA r=3", {"reduction": 3})],
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_length=128),
        pretrain=PretrainConfig(steps=1, batch_size=16, lr=1e-3, max_length=128, routers_only=True),  # unused
        max_train_examples=400,
    ),
    # a minute-long check of the whole pipeline (used by the tests)
    "smoke": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("CoDA r=3 + pretraining", {"reduction": 3}, pretrain=True),
            Row("LoRA (peft, rank 8)", {"reduction": 1, "adapter": "none", "lora_rank": 8}, train={"lr": 2e-3}),
        ],
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-3, max_length=32, val_size=0.2),
        pretrain=PretrainConfig(steps=2, batch_size=4, lr=1e-3, max_length=32, routers_only=True),
        max_train_examples=48,
        speed_repeats=2,
    ),
}


def run_experiment(
    preset: Preset, data: ClassificationData, out_dir: str | Path, model_name: str = "minilm", fresh: bool = False
) -> list[dict[str, Any]]:
    """Train every row (skipping finished ones unless ``fresh``), then time all of them side by side."""
    out_dir = Path(out_dir)
    if fresh:
        for row in preset.rows:
            shutil.rmtree(out_dir / row.slug, ignore_errors=True)
    if preset.max_train_examples is not None:
        data.train = subsample(data.train, preset.max_train_examples, preset.train.seed)
    for row in preset.rows:
        directory = out_dir / row.slug
        if (directory / METRICS_NAME).is_file():
            print(f"== {row.name}: done before, kept ({directory})")
            continue
        print(f"== {row.name}")
        train_row(row, preset, data, directory, model_name)
    results = [summarize_row(row, out_dir / row.slug) for row in preset.rows]
    speedups = measure_inference_speedups(preset, data, out_dir)
    for result in results:
        result["inference_speedup"] = speedups[result["name"]]
    dense = next(r for r in results if r["name"] == DENSE)
    for result in results:
        result["training_speedup"] = dense["epoch_seconds"] / result["epoch_seconds"]
    write_results(results, preset, out_dir)
    return results


def train_row(row: Row, preset: Preset, data: ClassificationData, directory: Path, model_name: str) -> None:
    config = CodaConfig(**{"pooling": "mean", **preset.base, **row.coda})
    torch.manual_seed(preset.train.seed)
    extra: dict[str, Any] = {"row": row.name}
    if row.pretrain:
        pretrain_dir = directory / "pretrain"
        model, tokenizer = build_pretraining_model(model_name, config, preset.pretrain.objective)
        metrics = pretrain(model, tokenizer, data.train.texts, preset.pretrain, pretrain_dir, model_name=model_name)
        extra["pretrain"] = {k: metrics[k] for k in ("objective", "first_loss", "final_loss", "pretrain_seconds")}
        torch.manual_seed(preset.train.seed)
    model, tokenizer = build_classifier(model_name, config, data.label_names)
    if row.pretrain:
        load_backbone_adapter(model, directory / "pretrain")
    train_config = TrainConfig(**{**asdict(preset.train), **row.train})
    train_classifier(model, tokenizer, data, train_config, directory, model_name=model_name, extra_metrics=extra)


def summarize_row(row: Row, directory: Path) -> dict[str, Any]:
    metrics = json.loads((directory / METRICS_NAME).read_text())
    return {
        "name": row.name,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "train_seconds": metrics["train_seconds"],
        "epoch_seconds": statistics.mean(metrics["epoch_seconds"]),
        "pretrain_seconds": metrics.get("pretrain", {}).get("pretrain_seconds"),
        "eval_examples_per_second": metrics["eval_examples_per_second"],
        "val_accuracy": metrics["history"][-1].get("val_accuracy"),
        "coda_config": metrics["coda_config"],
    }


def measure_inference_speedups(preset: Preset, data: ClassificationData, out_dir: Path) -> dict[str, float]:
    """Time every trained classifier on the same test batch, interleaved; speed-up over the dense row."""
    from .bench import time_interleaved

    steps = {}
    for row in preset.rows:
        model, tokenizer, task = load_classifier(out_dir / row.slug)
        merge_lora(model)
        batch = tokenizer(
            data.test.texts[: preset.speed_batch],
            truncation=True,
            max_length=task["max_length"],
            padding=True,
            return_tensors="pt",
        )

        def step(model: Any = model, batch: Any = batch) -> None:
            with torch.inference_mode():
                model(**batch)

        steps[row.name] = step
    times = time_interleaved(steps, preset.speed_repeats, warmup=2)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {name: medians[DENSE] / median for name, median in medians.items()}


def merge_lora(model: torch.nn.Module) -> None:
    """Fold peft LoRA into the frozen weights, as a LoRA model is deployed."""
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "merge"):
            module.merge()


def write_results(results: list[dict[str, Any]], preset: Preset, out_dir: Path) -> None:
    document = {"rows": results, "train_config": asdict(preset.train), "pretrain_config": asdict(preset.pretrain)}
    write_json(out_dir / "results.json", document)
    table = format_results(results)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)
    plot_results(results, out_dir / "results.png")


def format_results(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | test accuracy | macro-F1 | eval examples/s | inference speed-up | training s/epoch "
        "| training speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        pretrain = f" (+{r['pretrain_seconds']:.0f} s pretraining)" if r["pretrain_seconds"] else ""
        lines.append(
            f"| {r['name']} | {100 * r['accuracy']:.1f}% | {100 * r['macro_f1']:.1f} "
            f"| {r['eval_examples_per_second']:.1f} | {r['inference_speedup']:.2f}x "
            f"| {r['epoch_seconds']:.0f}{pretrain} | {r['training_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def plot_results(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for r in results:
        marker = "s" if r["coda_config"]["reduction"] == 1 else "o"
        axis.scatter(r["inference_speedup"], 100 * r["accuracy"], marker=marker)
        axis.annotate(
            r["name"],
            (r["inference_speedup"], 100 * r["accuracy"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    axis.set_xlabel("measured inference speed-up over the dense parallel adapter")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("BBC News, all-MiniLM-L6-v2")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
