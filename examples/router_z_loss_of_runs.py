"""The router z-loss of trained classifiers: how far `coda train --router-z-loss W` moved the routers' scores.

    python examples/router_z_loss_of_runs.py runs/needle-z/coda-r-5/seed-* \
        runs/needle-z/coda-r-5-router-z-loss-0-001/seed-* --data bbc-needle --max-length 128

For each `coda train` output, the mean over routed layers and the first ``--texts`` test texts of
``logsumexp(scores)²`` (:func:`coda_adapters.router_z_loss`), with the routers in training mode (the loss is a
training term; everything else stays in evaluation mode, so dropout does not move it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from coda_adapters.app.classify import load_classifier
from coda_adapters.app.data import builtin_dataset


def router_z_loss_of(adapter_dir: str | Path, texts: list[str], max_length: int) -> float:
    """The router z-loss of the classifier saved in ``adapter_dir`` on ``texts`` (one padded batch)."""
    model, tokenizer, _ = load_classifier(adapter_dir)
    for layer in model.conditional_layers().values():
        if layer.router is not None:
            layer.router.train()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    return float(model.router_z_loss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="coda train output directories")
    parser.add_argument("--data", default="bbc-needle", help="a built-in dataset whose test texts are used")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--texts", type=int, default=64)
    args = parser.parse_args()
    _, tokenizer, _ = load_classifier(args.runs[0])
    texts = builtin_dataset(args.data, tokenizer, args.max_length).test.texts[: args.texts]
    for run in args.runs:
        print(f"{router_z_loss_of(run, texts, args.max_length):8.2f}  {run}")


if __name__ == "__main__":
    main()
