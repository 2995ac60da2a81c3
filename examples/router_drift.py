"""How far fine-tuning moves the routers, and how strongly they score the frozen model's tokens.

    python examples/router_drift.py runs/needle-pre/coda-r-3/seed-* \
        runs/needle-pre/coda-r-3-layer-wise-pretraining-routers/seed-*

For each run of `coda experiment` (or `coda train` with the default ``--router-init random``), per routed layer:
- the cosine between the router's weight where fine-tuning started and where it ended. The start is the
  run's ``pretrain/`` output when it has one, else the random draw the runner made: the classifier rebuilt
  with the run's seed, as ``experiment.train_row`` builds it;
- the spread (standard deviation over the real tokens of the first ``--texts`` test texts) of the router's
  scores of the frozen model's hidden states (the layer's input with every adapter off), at the start and the
  end, and of the end router's scores of the fine-tuned model's own layer inputs (routed, adapters on).

A router scores ``w · h``, where ``h`` carries the adapters' outputs from the layers below; a router that barely
moves still routes what the adapters make it score highly, easily when the frozen states alone give it a
narrow spread of scores. Used in the README's "Why pretrained routers cost r = 3".
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from coda_adapters import CodaModel
from coda_adapters.app.assets import resolve_model_path
from coda_adapters.app.classify import build_classifier, load_backbone_adapter, load_classifier
from coda_adapters.app.data import builtin_dataset
from coda_adapters.checkpoint import read_coda_config
from coda_adapters.files import read_json_object


def router_weights(model: CodaModel) -> list[torch.Tensor]:
    """The routed layers' router weights ``[hidden]``, in layer order."""
    return [layer.router.weight.detach().clone() for layer in model.conditional_layers().values() if layer.router]


def starting_model(run: Path) -> CodaModel:
    """The classifier as fine-tuning of ``run`` started: rebuilt with its seed, its routers (and adapters)
    loaded from its CoDA pretraining if it had one."""
    metrics = read_json_object(run / "metrics.json")
    train_config = metrics["train_config"]
    if train_config.get("router_init", "random") != "random":
        raise ValueError(
            f"{run} fitted its routers when training started (--router-init {train_config['router_init']}); "
            "only runs whose routers start from a random draw or a CoDA pretraining can be rebuilt"
        )
    task = read_json_object(run / "coda_task.json")
    torch.manual_seed(train_config["seed"])  # as experiment.train_row, right before it builds the classifier
    config = read_coda_config(run)
    model, _ = build_classifier(task["model"], config, task["label_names"])
    if (run / "pretrain").is_dir():
        load_backbone_adapter(model, run / "pretrain")
    return model


def layer_inputs(model: CodaModel, tokenizer, texts: list[str], max_length: int, frozen: bool) -> list[torch.Tensor]:
    """Each routed layer's input, real tokens only ``[tokens, hidden]``: from the frozen model (adapters and
    routing off) or, without ``frozen``, from ``model`` itself (routed, with its adapters)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad(), model.disable_adapters() if frozen else contextlib.nullcontext():
        states = model(**batch, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    valid = batch["attention_mask"].bool()
    return [states[index][valid] for index in model.conditional_layers()]


def drift_report(run: Path, texts: list[str]) -> list[dict[str, float]]:
    """Per routed layer of ``run``: ``cosine`` (start, end), ``spread_start`` and ``spread_end`` (on the frozen
    model's states of ``texts``), ``spread_tuned`` (the end router on the fine-tuned model's own states)."""
    trained, tokenizer, task = load_classifier(run)
    start = router_weights(starting_model(run))
    end = router_weights(trained)
    frozen = layer_inputs(trained, tokenizer, texts, task["max_length"], frozen=True)
    tuned = layer_inputs(trained, tokenizer, texts, task["max_length"], frozen=False)
    return [
        {
            "cosine": float(F.cosine_similarity(first, last, dim=0)),
            "spread_start": float((hidden @ first).std()),
            "spread_end": float((hidden @ last).std()),
            "spread_tuned": float((own @ last).std()),
        }
        for first, last, hidden, own in zip(start, end, frozen, tuned, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (with metrics.json)")
    parser.add_argument("--texts", type=int, default=64, help="test texts whose tokens the scores are taken over")
    args = parser.parse_args()
    reports = []
    for run in args.runs:
        task = read_json_object(run / "coda_task.json")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(task["model"]))
        data = builtin_dataset(read_json_object(run / "metrics.json")["data"], tokenizer, task["max_length"])
        reports.append(drift_report(run, data.test.texts[: args.texts]))
        print_report(f"{run}  (layers 0 to {len(reports[-1]) - 1})", reports[-1])
    if len(reports) > 1:
        means = [mean_layer(layers) for layers in zip(*reports, strict=True)]  # runs of one model: the same layers
        print_report(f"mean over the {len(reports)} runs", means)


def mean_layer(layers: tuple[dict[str, float], ...]) -> dict[str, float]:
    """One layer's figures averaged over runs."""
    return {key: sum(layer[key] for layer in layers) / len(layers) for key in layers[0]}


def print_report(title: str, report: list[dict[str, float]]) -> None:
    print(title)
    for key in report[0]:
        print(f"  {key:<13}" + " ".join(f"{layer[key]:6.3f}" for layer in report))


if __name__ == "__main__":
    main()
