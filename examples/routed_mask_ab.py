"""A/B of the routed layers' attention mask in an ONNX export: `[batch, 1, 1, k]` against `transformers`' own.

    python examples/routed_mask_ab.py /tmp/mask-ab
    python examples/onnx_profile.py /tmp/mask-ab/old/model.int8.onnx /tmp/mask-ab/new/model.int8.onnx \
        /tmp/mask-ab/old/model.onnx /tmp/mask-ab/new/model.onnx --threads 2 --calls 12

Builds one random CoDA r = 3 MiniLM classifier (as `coda bench --runtime onnxruntime` does), exports it with the
BERT binding's `[batch, 1, 1, k]` key mask (``new/``) and with `transformers`' `[batch, 1, k, k]` bidirectional
mask swapped in (``old/``), both with their int8 graphs, and prints each graph's node count; the second command
times the four graphs in interleaved rounds (8 x 512 random tokens).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from transformers.masking_utils import create_bidirectional_mask

import coda_adapters.bindings.bert as bert


@contextlib.contextmanager
def transformers_mask() -> Iterator[None]:
    """Inside the block the BERT binding masks empty slots with `transformers`' `[batch, 1, k, k]` mask."""
    ours = bert.selected_keys_mask
    bert.selected_keys_mask = lambda config, states, slots: create_bidirectional_mask(
        config=config, inputs_embeds=states, attention_mask=slots
    )
    try:
        yield
    finally:
        bert.selected_keys_mask = ours


def export_both(root: Path, model: str = "minilm", reduction: float = 3) -> list[Path]:
    """``[old int8, new int8, old float, new float]`` graphs of one random classifier under ``root``."""
    from coda_adapters.app.export import export_onnx
    from coda_adapters.app.loadtest import build_random_adapter

    adapter = root / "adapter"
    build_random_adapter(adapter, model, reduction, [f"class {i}" for i in range(5)], 512, seed=0)
    export_onnx(adapter, root / "new", quantize_int8=True)
    with transformers_mask():
        export_onnx(adapter, root / "old", quantize_int8=True)
    return [
        root / "old/model.int8.onnx",
        root / "new/model.int8.onnx",
        root / "old/model.onnx",
        root / "new/model.onnx",
    ]


def main() -> None:
    import onnx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a directory for the adapter and the two exports")
    for path in export_both(parser.parse_args().out):
        print(f"{len(onnx.load(str(path)).graph.node):6d} nodes  {path}")


if __name__ == "__main__":
    main()
