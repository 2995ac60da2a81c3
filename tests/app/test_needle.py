"""bbc-needle: every example holds its whole needle and two distractors at a random place in real BBC text."""

import re

import pytest

from coda_adapters.app.data import bbc_news_split, builtin_dataset
from coda_adapters.app.needle import KEYS, needle_examples, sentences

INSERT = re.compile(r"The (access code is|old code was) (\w+)\.")


@pytest.fixture(scope="module")
def documents():
    return bbc_news_split().train.texts[:80]


def normalised(text):
    return " ".join(text.split())


def test_every_example_fits_whole_with_one_needle_and_two_other_colours(documents, minilm_tokenizer):
    texts, labels = needle_examples(documents, minilm_tokenizer, 96, seed=1)
    assert len(texts) == len(documents) and set(labels) == set(range(len(KEYS)))
    for text, label, document in zip(texts, labels, documents, strict=True):
        assert len(minilm_tokenizer(text)["input_ids"]) <= 96  # never cut by the tokenizer
        found = INSERT.findall(text)
        needles = [colour for kind, colour in found if kind == "access code is"]
        distractors = [colour for kind, colour in found if kind == "old code was"]
        assert needles == [KEYS[label]]
        assert len(set(distractors)) == 2 and KEYS[label] not in distractors
        context = normalised(INSERT.sub(" ", text))  # what is left is the document's opening, unchanged
        assert context and normalised(" ".join(sentences(document))).startswith(context)


def test_the_needle_sits_at_every_depth_so_a_prefix_misses_it_often(documents, minilm_tokenizer):
    texts, _ = needle_examples(documents, minilm_tokenizer, 128, seed=1)
    depths = []
    for text in texts:
        ids = minilm_tokenizer(text)["input_ids"]
        depths.append(ids.index(minilm_tokenizer.convert_tokens_to_ids("access")) / len(ids))
    first_third = sum(depth < 1 / 3 for depth in depths) / len(depths)
    last_third = sum(depth > 2 / 3 for depth in depths) / len(depths)
    assert 0.2 < first_third < 0.6 and 0.15 < last_third < 0.5


def test_examples_depend_only_on_the_seed(documents, minilm_tokenizer):
    first = needle_examples(documents[:20], minilm_tokenizer, 64, seed=1)
    assert needle_examples(documents[:20], minilm_tokenizer, 64, seed=1) == first
    assert needle_examples(documents[:20], minilm_tokenizer, 64, seed=2)[0] != first[0]
    copies, _ = needle_examples(documents[:20], minilm_tokenizer, 64, seed=1, copies=2)
    assert copies[::2] == first[0] and copies[1::2] != first[0]


def test_too_short_a_max_length_is_refused(documents, minilm_tokenizer):
    with pytest.raises(ValueError, match="--max-length 19 leaves no room .* needs at least 20 tokens"):
        needle_examples(documents[:2], minilm_tokenizer, 19, seed=1)
    assert len(needle_examples(documents[:2], minilm_tokenizer, 20, seed=1)[0]) == 2  # the three sentences alone
    with pytest.raises(ValueError, match="bbc-needle is built for a tokenizer and a max_length"):
        builtin_dataset("bbc-needle")


def test_routed_evidence_counts_what_each_layer_ran_on(documents, minilm_tokenizer):
    import torch

    from coda_adapters import CodaConfig, get_coda_model
    from coda_adapters.app.needle import routed_evidence

    from helpers import randomize_trainable, tiny_model

    model = get_coda_model(
        tiny_model("bert", head=True, vocab_size=minilm_tokenizer.vocab_size, num_labels=5), CodaConfig(reduction=3)
    ).eval()
    randomize_trainable(model, seed=3)
    texts, _ = needle_examples(documents[:12], minilm_tokenizer, 64, seed=1)
    shares = routed_evidence(model, minilm_tokenizer, texts, 64, batch_size=5)  # batches of mixed lengths

    access, old = minilm_tokenizer.convert_tokens_to_ids(["access", "old"])
    expected = {layer: {"key": 0.0, "access": 0.0, "distractor": 0.0} for layer in (0, 1)}
    for text in texts:  # one text at a time; the needle found by its token ids instead of character offsets
        ids = minilm_tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            model(input_ids=ids)
        tokens = ids[0].tolist()
        a = tokens.index(access)
        olds = [i for i, t in enumerate(tokens) if t == old]
        for layer, positions in model.routing_trace().items():
            kept = set(positions[0].tolist())
            expected[layer]["key"] += (a + 3 in kept) / len(texts)  # access code is KEY
            expected[layer]["access"] += (a in kept) / len(texts)
            expected[layer]["distractor"] += sum(i + 3 in kept for i in olds) / len(olds) / len(texts)
    assert shares.keys() == expected.keys()
    for layer in expected:
        assert shares[layer] == pytest.approx(expected[layer])
    assert 0 < sum(s["key"] + s["access"] for s in shares.values()) < 4  # neither nothing nor everything
