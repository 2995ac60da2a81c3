"""Batch prediction past one machine: the step `coda predict --file IN --out OUT` does, as a Ray Data map.

    python examples/ray_data_predict.py --adapter runs/bbc-r3 --input big.jsonl --output preds/

`ray.init()` joins the cluster that `RAY_ADDRESS` names (or starts Ray on this machine); every worker
loads the adapter once and classifies batches of rows, which Ray streams from the input files to the
output files. Each output row is the input row with `label` and `probabilities` added (a dict, as
`coda predict --out` writes it). Unlike `coda predict --out`, the output is a folder of JSONL files in
Ray's order, and an interrupted run starts over: Ray Data does not resume a write.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


class Classifier:
    """A `coda train` output, loaded once per Ray worker and called on batches (dicts of numpy columns)."""

    def __init__(self, adapter: str, text_column: str = "text", batch_size: int = 32, threads: int = 1) -> None:
        import torch

        from coda_adapters.app.classify import load_classifier

        torch.set_num_threads(threads)  # one worker per core: no oversubscription
        self.model, self.tokenizer, self.task = load_classifier(adapter)
        self.text_column, self.batch_size = text_column, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from coda_adapters.app.classify import Encoded, predict_probabilities

        texts = [str(text) for text in batch[self.text_column]]
        encoded = Encoded(self.tokenizer, texts, None, self.task["max_length"])
        probabilities, _ = predict_probabilities(self.model, encoded, self.batch_size)
        names = self.task["label_names"]
        batch["label"] = np.array([names[i] for i in probabilities.argmax(-1).tolist()])
        batch["probabilities"] = [dict(zip(names, row, strict=True)) for row in probabilities.tolist()]
        return batch


def predict_with_ray(
    adapter: str,
    input_path: str,
    output_dir: str,
    *,
    workers: int = 2,
    batch_size: int = 256,
    text_column: str = "text",
) -> None:
    """Classify every row of the JSONL file(s) ``input_path`` into JSONL files in ``output_dir``."""
    import ray

    dataset = ray.data.read_json(input_path, lines=True)
    predicted = dataset.map_batches(
        Classifier,
        fn_constructor_kwargs={"adapter": adapter, "text_column": text_column},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
    )
    predicted.write_json(output_dir)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="a `coda train` output directory")
    parser.add_argument("--input", required=True, help="a JSONL file (or a folder or glob of them)")
    parser.add_argument("--output", required=True, help="a folder for the JSONL output files")
    parser.add_argument(
        "--workers", type=int, help="Ray workers, each with the adapter loaded (default: the cluster's CPUs but one)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batch handed to a worker")
    parser.add_argument("--text-column", default="text", help="the field holding the text")
    args = parser.parse_args()
    ray.init()
    # each worker holds a CPU for its whole life: leave one to Ray's read and write tasks, or nothing runs
    workers = args.workers or max(1, int(ray.cluster_resources()["CPU"]) - 1)
    options = {"workers": workers, "batch_size": args.batch_size, "text_column": args.text_column}
    predict_with_ray(args.adapter, args.input, args.output, **options)


if __name__ == "__main__":
    main()
