"""How well the ViT demo's routers follow the digit: for each routed variant a `coda vision` run saved, the
share of each test image's ink patches that every routed layer ran (`coda_adapters.app.vision.ink_recall`).

    python examples/vision_ink_recall.py runs/vision-anywhere/seed-0

The run's results.json gives the settings (test split, patch size) and the backbone's directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from coda_adapters import CodaModel
from coda_adapters.app.vision import (
    RESULTS_NAME,
    DemoSettings,
    Variant,
    accuracy,
    digits_task,
    ink_recall,
    load_with_fresh_head,
)
from coda_adapters.app.vision_data import ink_patches


def ink_recall_report(run: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """For the run in ``run``: how many test images and ink patches per image (of how many patches), and per
    routed variant (``rows``) its name, test accuracy, ink recall per routed layer, and the share a router
    that ignores the image would run."""
    results = json.loads((run / RESULTS_NAME).read_text(encoding="utf-8"))
    settings = DemoSettings.from_dict(results["settings"])
    cache_dir = cache_dir or Path(results["backbone"]["directory"])
    test = digits_task(settings).test
    patches = settings.shape.grid**2
    rows = []
    for name, record in results["variants"].items():
        if record["reduction"] == 1:
            continue  # the dense adapter and the crops run fixed tokens
        directory = run / Variant(record["reduction"], record["router"]).directory_name
        # the fresh head of the run's seed is replaced by the adapter's own
        model = CodaModel.from_pretrained(load_with_fresh_head(cache_dir, settings.adapt.seed), directory)
        rows.append(
            {
                "variant": name,
                "test_accuracy": accuracy(model, test),
                "ink_recall": ink_recall(model, test, settings.shape.patch_size),
                "chance": (record["tokens_per_layer"] - 1) / patches,
            }
        )
    ink = ink_patches(test.pixels, settings.shape.patch_size)
    return {
        "test_images": len(test),
        "ink_patches_per_image": ink.sum(1).float().mean().item(),
        "patches": patches,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `coda vision` output directory (one seed)")
    parser.add_argument("--cache-dir", type=Path, help="the run's backbone (default: the one results.json names)")
    args = parser.parse_args()
    report = ink_recall_report(args.run, args.cache_dir)
    print(
        f"{report['test_images']} test images, {report['ink_patches_per_image']:.1f} of {report['patches']} "
        "patches with ink on average\n"
    )
    print("| variant | test accuracy | ink patches run, per routed layer | by a router that ignores the image |")
    print("|---|---|---|---|")
    for row in report["rows"]:
        per_layer = ", ".join(f"{share:.0%}" for share in row["ink_recall"].values())
        print(f"| {row['variant']} | {row['test_accuracy']:.1%} | {per_layer} | {row['chance']:.0%} |")


if __name__ == "__main__":
    main()
