"""How far apart CoDA pretraining leaves the texts: the spread of mean-pooled sentence embeddings.

    python examples/pretrained_spread.py runs/needle-pre/coda-r-3-layer-wise-pretraining-*/seed-0/pretrain \
        --data bbc-needle --max-length 128

For the frozen backbone (dense, no adapter) and for each `coda pretrain` output (routed at its reduction; before
pretraining, as its configuration starts, and after), on
the first ``--texts`` test texts: the spread (the standard deviation over texts of each feature of the
mean-pooled last hidden state, averaged over features) and the mean cosine similarity between two texts'
embeddings. A pretraining whose routed layers drift to where their targets are easy to match collapses the
texts onto one point: spread near 0, cosine near 1, and a classifier trained from there starts at chance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from coda_adapters import CodaModel, get_coda_model
from coda_adapters.app.assets import resolve_model_path
from coda_adapters.app.classify import load_backbone_adapter
from coda_adapters.app.data import builtin_dataset
from coda_adapters.checkpoint import read_coda_config
from coda_adapters.pooling import weighted_mean


def pooled_spread(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int) -> tuple[float, float]:
    """``(spread, mean cosine)`` of ``model``'s mean-pooled last hidden states of ``texts`` (one padded batch)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state  # [texts, seq, hidden]
    pooled = weighted_mean(states, batch["attention_mask"])  # [texts, hidden]; padding left out
    unit = F.normalize(pooled, dim=-1)
    cosines = unit @ unit.T
    off_diagonal = ~torch.eye(len(texts), dtype=torch.bool)
    return float(pooled.std(0).mean()), float(cosines[off_diagonal].mean())


def pretrained_backbone(path: str | Path, directory: str | Path, pretrained: bool = True) -> CodaModel:
    """The backbone at ``path`` with a `coda pretrain` output's routers (and adapters, unless it trained the
    routers only: their adapters keep the zero output they start from), in evaluation mode; without
    ``pretrained``, the same configuration as it starts (routers drawn with seed 0, adapters at zero)."""
    base = AutoModel.from_pretrained(path)
    torch.manual_seed(0)
    model = get_coda_model(base, read_coda_config(Path(directory), base))
    if pretrained:
        load_backbone_adapter(model, directory)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrained", nargs="*", help="coda pretrain output directories")
    parser.add_argument("--model", default="minilm", help="the backbone they were pretrained on")
    parser.add_argument("--data", default="bbc-needle", help="a built-in dataset whose test texts are used")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--texts", type=int, default=64)
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = builtin_dataset(args.data, tokenizer, args.max_length).test.texts[: args.texts]
    print("spread  cosine  model")
    spread, cosine = pooled_spread(AutoModel.from_pretrained(path).eval(), tokenizer, texts, args.max_length)
    print(f"{spread:6.3f}  {cosine:6.3f}  the frozen backbone")
    for directory in args.pretrained:
        for pretrained in (False, True):
            model = pretrained_backbone(path, directory, pretrained)
            spread, cosine = pooled_spread(model, tokenizer, texts, args.max_length)
            when = "after" if pretrained else "before"
            print(f"{spread:6.3f}  {cosine:6.3f}  {directory} (r = {model.reduction:g}), {when} pretraining")


if __name__ == "__main__":
    main()
