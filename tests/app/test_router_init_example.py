"""examples/router_init_fit.py: the fit over all tokens is what coda train records, the special tokens are
found, and the variance share is a share, recomputed by hand for a layer."""

import pytest
import torch
from transformers import AutoTokenizer

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.router_init import attention_received

from helpers import load_example, save_tiny_base

TEXTS = ["Shares rose sharply.", "The access code is blue, said the note.", "Rain again today in the north."]


def test_fit_report_rows_and_the_special_tokens_share(tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    example = load_example("router_init_fit")
    base_dir = save_tiny_base(tmp_path / "base", head=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_coda_model(AutoModelForSequenceClassification.from_pretrained(base_dir), CodaConfig(reduction=2))
    rows = example.fit_report(model, tokenizer, TEXTS, max_length=16)
    assert [row[0] for row in rows] == sorted(model.conditional_layers())
    encoded = tokenizer(TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt")
    special = example.special_token_mask(encoded["input_ids"], tokenizer)
    valid = encoded["attention_mask"].bool()
    assert special[:, 0].all() and not special[valid].all()  # [CLS] first, words after
    assert (special | valid).all()  # padding is special too
    base = model.eval().model  # no dropout, as the example's dense pass
    base.set_attn_implementation("eager")
    with torch.no_grad(), model.disable_adapters():
        attentions = base(**encoded, output_attentions=True).attentions
    for index, everything, text, share, text_fit in rows:
        assert -1 <= text <= 1 and -1 <= everything <= 1
        assert text_fit >= text - 1e-4  # least squares over the text tokens ranks them at least as well
        received = attention_received(attentions[index], valid)
        centred = [(received[b, valid[b]] - received[b, valid[b]].mean()) for b in range(len(TEXTS))]
        by_hand = sum(float((c[special[b, valid[b]]] ** 2).sum()) for b, c in enumerate(centred))
        by_hand /= sum(float((c**2).sum()) for c in centred)
        assert share == pytest.approx(by_hand, abs=1e-4)
