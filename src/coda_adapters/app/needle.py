"""``bbc-needle``: BBC News texts with an access code hidden at a random place.

A classification task whose evidence is a few tokens anywhere in the input, so that which tokens the
frozen layers see matters. Each example is the start of one BBC News document, cut at a sentence
boundary to fit ``max_length`` tokens, with three sentences put in at random sentence boundaries::

    The access code is KEY.        (the needle; KEY is the label, one of five colours)
    The old code was OTHER.        (twice, two other colours: distractors)

Every colour of the three sentences appears once, so counting words cannot tell the key from the
distractors: the model has to read "access code is" next to its colour. The needle sits at a uniformly
random depth, so cutting the input to its first ``n / r`` tokens keeps it in about ``1 / r`` of the
examples. It is fair to every row of an experiment: they see the same texts (built by one seeded
recipe from the fixed BBC News split), and the dense adapter, which reads every token, solves it.
The pass-key retrieval probes of long-context language models are the same idea.
"""

from __future__ import annotations

import random
import re
from typing import Any

KEYS = ("red", "blue", "green", "yellow", "white")
NEEDLE = "The access code is {}."
DISTRACTOR = "The old code was {}."
NEEDLE_PATTERN = re.compile(r"The (access) code is (\w+)\.")
DISTRACTOR_PATTERN = re.compile(r"The old code was (\w+)\.")
DISTRACTORS = 2
TRAIN_SEED, TEST_SEED = 1, 2
TEST_COPIES = 2  # two examples per test document (852): one example is 0.12 points


def needle_examples(
    documents: list[str], tokenizer: Any, max_length: int, *, seed: int, copies: int = 1
) -> tuple[list[str], list[int]]:
    """``(texts, labels)``: ``copies`` examples per document, each at most ``max_length`` tokens of ``tokenizer``
    (special tokens included); example ``(i, c)`` depends only on ``seed``, ``i`` and ``c``."""
    special = tokenizer.num_special_tokens_to_add(pair=False)
    budget = max_length - special
    longest_key = max(len(_tokens(tokenizer, key)) for key in KEYS)
    inserts_length = sum(len(_tokens(tokenizer, s.format(KEYS[0]))) for s in [NEEDLE] + [DISTRACTOR] * DISTRACTORS)
    inserts_length += (1 + DISTRACTORS) * (longest_key - len(_tokens(tokenizer, KEYS[0])))
    if budget < inserts_length:
        raise ValueError(
            f"--max-length {max_length} leaves no room for the needle and distractors: bbc-needle needs at least "
            f"{special + inserts_length} tokens ({inserts_length} for the three sentences, {special} special tokens)"
        )
    texts, labels = [], []
    for i, document in enumerate(documents):
        for copy in range(copies):
            rng = random.Random(f"{seed}-{i}-{copy}")
            key = rng.randrange(len(KEYS))
            others = rng.sample([k for k in range(len(KEYS)) if k != key], DISTRACTORS)
            inserts = [NEEDLE.format(KEYS[key])] + [DISTRACTOR.format(KEYS[k]) for k in others]
            context = leading_sentences(document, tokenizer, budget - inserts_length)
            texts.append(" ".join(insert_at_random_boundaries(context, inserts, rng)))
            labels.append(key)
    return texts, labels


def sentences(text: str) -> list[str]:
    """The sentences (and the headline line) of a document."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def leading_sentences(document: str, tokenizer: Any, budget: int) -> list[str]:
    """The document's first sentences, as many as fit ``budget`` tokens together (joined by spaces)."""
    kept: list[str] = []
    for sentence in sentences(document):
        if len(_tokens(tokenizer, " ".join([*kept, sentence]))) > budget:
            break
        kept.append(sentence)
    return kept


def insert_at_random_boundaries(context: list[str], inserts: list[str], rng: random.Random) -> list[str]:
    """``context`` with each of ``inserts`` put at a uniformly random sentence boundary (in random order
    where two share one)."""
    slots = sorted((rng.randint(0, len(context)), rng.random(), text) for text in inserts)
    pieces = list(context)
    for offset, (slot, _, text) in enumerate(slots):
        pieces.insert(slot + offset, text)
    return pieces


def routed_evidence(
    model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 32
) -> dict[int, dict[str, float]]:
    """Per routed layer of a trained classifier, the share of ``texts`` in which its frozen layer ran on the
    needle's colour (``"key"``), on the word "access" (``"access"``), and on a distractor's colour
    (``"distractor"``, the mean over both): what the routers learned to look at."""
    from .explain import explain_texts

    hits: dict[int, dict[str, float]] = {}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        explanations = explain_texts(model, tokenizer, chunk, list(KEYS), max_length)
        for text, explanation in zip(chunk, explanations, strict=True):
            encoding = tokenizer(text, truncation=True, max_length=max_length)
            needle = NEEDLE_PATTERN.search(text)
            key, access = encoding.char_to_token(needle.start(2)), encoding.char_to_token(needle.start(1))
            distractors = [encoding.char_to_token(m.start(1)) for m in DISTRACTOR_PATTERN.finditer(text)]
            for layer, kept in explanation.kept.items():
                shares = hits.setdefault(layer, {"key": 0.0, "access": 0.0, "distractor": 0.0})
                shares["key"] += kept[key]
                shares["access"] += kept[access]
                shares["distractor"] += sum(kept[t] for t in distractors) / len(distractors)
    return {layer: {name: value / len(texts) for name, value in shares.items()} for layer, shares in hits.items()}


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
