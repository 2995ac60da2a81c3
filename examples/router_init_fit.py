"""How well routers fitted to the frozen model's attention track it, over all tokens and over the text alone.

    python examples/router_init_fit.py --data bbc-needle --max-length 128 --reduction 5

``coda train --router-init attention`` fits each router to the attention its layer's tokens receive in the
frozen model and records the fit in ``metrics.json`` (``router_init_fit``). In BERT-like models most of that
attention goes to ``[CLS]`` and ``[SEP]`` (attention sinks), so the fit over all tokens mostly says that the
router found them. This prints, per routed layer: that fit, the same correlation over the text tokens only,
the share of the target's variance (per-example centred) that the special tokens hold, and the fit over the
text tokens of routers fitted over the text tokens only (``coda train --router-init attention-text``).
"""

from __future__ import annotations

import argparse

import torch

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.app.classify import CALIBRATION_EXAMPLES, special_token_mask
from coda_adapters.router_init import attention_agreement, init_routers_from_attention


def sink_variance_share(model, inputs: dict[str, torch.Tensor], special: torch.Tensor) -> dict[int, float]:
    """Per routed layer, the share of the per-example centred attention received that the special tokens hold."""
    from coda_adapters.router_init import _centred, _dense_pass, attention_received, learned_router_layers

    _, attentions, valid = _dense_pass(model, inputs)
    shares = {}
    for index in learned_router_layers(model):
        squared = _centred(attention_received(attentions[index], valid), valid) ** 2
        shares[index] = float(squared[valid & special].sum() / squared[valid].sum())
    return shares


def fit_report(model, tokenizer, texts: list[str], max_length: int) -> list[tuple[int, float, float, float, float]]:
    """``(layer, fit over all tokens, its agreement over text tokens, special tokens' variance share, fit over
    text tokens when fitted over them)`` per routed layer, fitting the routers of ``model`` (a CodaModel) on
    ``texts`` over every token (``coda train --router-init attention``), then over the text tokens only
    (``--router-init attention-text``, whose routers ``model`` keeps)."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    fits = init_routers_from_attention(model, inputs)
    special = special_token_mask(encoded["input_ids"], tokenizer)
    text_only = attention_agreement(model, inputs, tokens=~special)
    shares = sink_variance_share(model, inputs, special)
    text_fits = init_routers_from_attention(model, inputs, tokens=~special)
    return [(index, fits[index], text_only[index], shares[index], text_fits[index]) for index in sorted(fits)]


def main() -> None:
    from transformers import AutoModelForSequenceClassification

    from coda_adapters.app.assets import load_tokenizer, resolve_model_path
    from coda_adapters.app.data import builtin_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="bundled model name or local model directory")
    parser.add_argument("--data", default="bbc-needle", choices=["bbc-news", "bbc-needle"])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--reduction", type=float, default=5)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    data = builtin_dataset(args.data, tokenizer, args.max_length)
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(args.model), num_labels=len(data.label_names)
    )
    model = get_coda_model(base, CodaConfig(reduction=args.reduction))
    rows = fit_report(model, tokenizer, data.train.texts[:CALIBRATION_EXAMPLES], args.max_length)
    print("           fitted over all tokens                             fitted over text tokens")
    print("layer  fit, all tokens  fit, text tokens  [CLS]/[SEP] share    fit, text tokens")
    for index, everything, text, share, text_fit in rows:
        print(f"{index:5d}  {everything:15.3f}  {text:16.3f}  {share:18.2f}    {text_fit:16.3f}")


if __name__ == "__main__":
    main()
