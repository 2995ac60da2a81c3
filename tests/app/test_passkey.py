"""The pass-key probe on a tiny random Llama with a character-level tokenizer (every digit one token)."""

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from coda_adapters import get_coda_model
from coda_adapters.app.passkey import keys_found, measure_passkey, passkey_problems, routed_needle_share
from coda_adapters.app.prefill_distill import PrefillRouting

from helpers import tiny_causal_lm


@pytest.fixture(scope="module")
def characters():
    alphabet = string.printable
    model = models.WordLevel({c: i for i, c in enumerate(alphabet)}, unk_token=" ")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def text_of(tokenizer, ids):
    return "".join(tokenizer.convert_ids_to_tokens(ids.tolist()))


def test_prompts_have_the_exact_length_and_the_key_at_its_recorded_depth(characters):
    problems = passkey_problems(characters, 1000, count=20, seed=0)
    assert problems.prompts.shape == (20, 1000) and problems.answers.shape == (20, 7)  # " 12345."
    for prompt, answer, key, depth, (start, end) in zip(
        problems.prompts, problems.answers, problems.keys, problems.depths, problems.needles, strict=True
    ):
        text = text_of(characters, prompt)
        assert text.startswith("There is an important pass key") and text.endswith("The pass key is")
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        assert text.index(needle) == round(depth * 1000) == start  # one character per token
        assert text[start:end] == needle
        assert text_of(characters, answer) == f" {key}."
    assert min(problems.depths) < 0.25 and max(problems.depths) > 0.75  # every depth, not one place
    assert passkey_problems(characters, 1000, count=20, seed=0).keys == problems.keys
    assert passkey_problems(characters, 1000, count=20, seed=1).keys != problems.keys
    with pytest.raises(ValueError, match="--seq-lens 150 is too short for the pass-key prompt"):
        passkey_problems(characters, 150, count=1, seed=0)


def test_a_key_is_found_exactly_when_greedy_decoding_writes_its_digits(characters):
    model = tiny_causal_lm(vocab_size=len(string.printable)).eval()
    problems = passkey_problems(characters, 260, count=3, seed=0)
    with torch.inference_mode():
        greedy = model.generate(problems.prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 260:]
    written = torch.cat([greedy, problems.answers[:, -1:]], dim=1)  # what the model writes, then "."
    assert keys_found(model, problems.prompts, written) == [True] * 3
    changed = written.clone()
    changed[:, 3] = (changed[:, 3] + 1) % len(string.printable)  # one digit off
    assert keys_found(model, problems.prompts, changed) == [False] * 3
    changed = written.clone()
    changed[:, -1] = (changed[:, -1] + 1) % len(string.printable)  # the final "." is not part of the key
    assert keys_found(model, problems.prompts, changed) == [True] * 3


def test_measure_passkey_compares_routing_and_truncation_with_the_dense_prompt(characters):
    model = tiny_causal_lm(vocab_size=len(string.printable)).eval()
    rows = measure_passkey(model, characters, 260, [3], count=2, pretrain_steps=2, pretrain_prompts=2)
    assert [row.method for row in rows] == [
        "dense",
        "coda r=3, random router",
        "coda r=3",
        "coda r=3, 2 steps of pass-key pretraining",
        "last n/3 tokens",
    ]
    assert all(0 <= row.found <= 1 and row.prompt_tokens == 260 for row in rows)


def test_the_needle_share_counts_the_needle_tokens_each_routed_layer_ran(characters):
    problems = passkey_problems(characters, 300, count=3, seed=0)
    model = tiny_causal_lm(vocab_size=len(string.printable), num_hidden_layers=3).eval()
    ends = PrefillRouting(keep_first=300, window_share=0).config(300, 3)  # every token kept: k raised to n
    assert routed_needle_share(get_coda_model(model, ends), problems) == 1.0
    tail = PrefillRouting(keep_first=0, window_share=1.0).config(300, 3)  # the last 100 tokens, like truncation
    coda = get_coda_model(tiny_causal_lm(vocab_size=len(string.printable), num_hidden_layers=3).eval(), tail)
    inside = [max(0, end - max(start, 200)) / (end - start) for start, end in problems.needles]
    assert routed_needle_share(coda, problems) == pytest.approx(sum(inside) / 3)
