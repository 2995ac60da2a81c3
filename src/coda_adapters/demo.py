"""A small built-in example: wrap MiniLM at r = 3 and show which tokens each layer processed.

Run with ``make demo`` or ``python -m coda_adapters.demo``.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer

from . import CodaConfig, get_coda_model
from .pretrained import resolve_model_path

SENTENCES = [
    "Conditional adapters run the frozen layers on only a third of the tokens.",
    "The router picks which tokens matter.",
    "Shares in the company rose sharply after the quarterly results beat expectations.",
]


def show_routing(tokens: list[str], trace: dict[int, torch.Tensor], row: int) -> None:
    """Print, per layer, the sentence with the routed tokens in [brackets]."""
    for layer, positions in trace.items():
        kept = {int(p) for p in positions[row] if p >= 0}
        text = " ".join(f"[{t}]" if i in kept else t for i, t in enumerate(tokens))
        print(f"  layer {layer} ({len(kept)}/{len(tokens)}): {text}")


def main() -> None:
    torch.manual_seed(0)
    path = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_coda_model(AutoModel.from_pretrained(path), CodaConfig(reduction=3))
    model.eval()
    model.print_trainable_parameters()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        model(**batch)
    trace = model.routing_trace()
    print("Tokens in [brackets] went through the frozen layer (router untrained: random init, seed 0);")
    print("the others got only the parallel adapter in that layer.\n")
    for row, sentence in enumerate(SENTENCES):
        length = int(batch["attention_mask"][row].sum())
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row][:length].tolist())
        print(f"{sentence}")
        show_routing(tokens, trace, row)
        print()


if __name__ == "__main__":
    main()
