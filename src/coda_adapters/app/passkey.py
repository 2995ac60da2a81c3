"""Pass-key retrieval for a decoder LM's routed prefill: a long-range task the dense model solves.

A five-digit key is hidden at a random depth in repetitive filler text and asked for at the end (the
probe of Mohtashami & Jaggi 2023, used for long-context models)::

    There is an important pass key hidden inside a lot of irrelevant text. ...
    The grass is green. The sky is blue. ... The pass key is 60494. Remember it. 60494 is the pass key. ...
    What is the pass key? The pass key is

Every prompt has exactly ``prompt_tokens`` tokens. A key counts as found when greedy decoding after the
prompt writes its five digits; that is checked by teacher forcing (greedy decoding reproduces the
answer exactly when the most likely token after each correct prefix is the answer's next token), so no
generation loop is needed. Keeping only the last ``n / r`` tokens finds the key only when it sits in
that last part; a routed prefill finds it only if its routers keep the key's tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .prefill_distill import PrefillRouting, distill_prefill, prefill_log_probs, routed_copy, routed_method

HEAD = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}."


@dataclass
class PasskeyProblems:
    """``prompts`` ``[count, prompt_tokens]`` and the answers ``[count, m]`` (the key's tokens, then "."),
    with the keys, the depth of each needle (its start as a share of the prompt) and its tokens' positions
    ``(start, end)``."""

    prompts: torch.Tensor
    answers: torch.Tensor
    keys: list[int]
    depths: list[float]
    needles: list[tuple[int, int]]

    @property
    def windows(self) -> torch.Tensor:
        """Prompt and answer in one row ``[count, prompt_tokens + m]`` (what prefill pretraining reads)."""
        return torch.cat([self.prompts, self.answers], dim=1)


def passkey_problems(tokenizer: Any, prompt_tokens: int, count: int, seed: int) -> PasskeyProblems:
    """``count`` prompts of exactly ``prompt_tokens`` tokens, each a random key at a uniformly random depth."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head, question = ids(HEAD), ids(QUESTION)
    sentences = [ids((" " if i else "") + sentence) for i, sentence in enumerate(FILLER)]
    rng = random.Random(seed)
    prompts, answers, keys, depths, needles = [], [], [], [], []
    for _ in range(count):
        key = rng.randint(10_000, 99_999)
        needle = ids(NEEDLE.format(key=key))
        room = prompt_tokens - len(head) - len(needle) - len(question)
        if room < 1:
            needed = prompt_tokens - room + 1
            raise ValueError(f"--seq-lens {prompt_tokens} is too short for the pass-key prompt (at least {needed})")
        filler, boundaries = [], [0]  # whole sentences, cut to length at the end; the needle goes between two
        while len(filler) < room:
            filler += sentences[len(boundaries) % len(sentences)]
            boundaries.append(len(filler))
        cut = rng.choice([b for b in boundaries if b <= room])
        prompts.append(head + filler[:cut] + needle + filler[cut:room] + question)
        answers.append(ids(ANSWER.format(key=key)))
        keys.append(key)
        depths.append((len(head) + cut) / prompt_tokens)
        needles.append((len(head) + cut, len(head) + cut + len(needle)))
    if len({len(answer) for answer in answers}) != 1:
        raise ValueError("this tokenizer splits five-digit keys into different numbers of tokens; the probe needs one")
    return PasskeyProblems(torch.tensor(prompts), torch.tensor(answers), keys, depths, needles)


def keys_found(model: nn.Module, prompts: torch.Tensor, answers: torch.Tensor, batch_size: int = 2) -> list[bool]:
    """For each prompt, whether greedy decoding after it writes the answer's digits (all answer tokens but the
    final ".") — by teacher forcing: the most likely token after each correct prefix is the answer's next one."""
    found = []
    for start in range(0, len(prompts), batch_size):
        prompt, answer = prompts[start : start + batch_size], answers[start : start + batch_size]
        log_probs = prefill_log_probs(model, prompt, answer[:, :-1])  # [batch, m, vocab]: predicts answer[:, :m]
        digits = answer.shape[1] - 1
        found += (log_probs[:, :digits].argmax(-1) == answer[:, :digits]).all(dim=-1).tolist()
    return found


def routed_needle_share(model: nn.Module, problems: PasskeyProblems, batch_size: int = 2) -> float:
    """The share of the needles' tokens that a routed prefill ran, over the routed layers and the prompts."""
    shares = []
    for start in range(0, len(problems.prompts), batch_size):
        with torch.inference_mode():
            model(input_ids=problems.prompts[start : start + batch_size], logits_to_keep=1)
        for row, (first, end) in enumerate(problems.needles[start : start + batch_size]):
            for trace in model.routing_trace().values():
                shares.append(float(((trace[row] >= first) & (trace[row] < end)).sum()) / (end - first))
    return sum(shares) / len(shares)


@dataclass
class PasskeyResult:
    """The share of keys found by one way of running the prompt, at one prompt length, and the share of the
    needle's tokens it ran (``needle_routed``: for the last n/r tokens, the share inside them)."""

    prompt_tokens: int
    method: str
    reduction: float
    found: float
    needle_routed: float = 1.0


def measure_passkey(
    model: nn.Module,
    tokenizer: Any,
    prompt_tokens: int,
    reductions: list[float],
    count: int,
    pretrain_steps: int = 0,
    pretrain_prompts: int = 64,
    reduction_warmup: float = 0.0,
    routing: PrefillRouting | None = None,
    seed: int = 0,
) -> list[PasskeyResult]:
    """The dense prefill, and per reduction: the routed prefill (``routing``, the decoder recipe by default; as
    built, and after ``pretrain_steps`` of prefill pretraining on ``pretrain_prompts`` other pass-key prompts)
    and the last ``n / r`` tokens alone. The scored prompts are the same for every ``seed``; it sets the
    routers' initial weights, the pretraining prompts and their order."""
    routing = routing or PrefillRouting()
    problems = passkey_problems(tokenizer, prompt_tokens, count, seed=0)
    rows = [PasskeyResult(prompt_tokens, "dense", 1.0, share(keys_found(model, problems.prompts, problems.answers)))]
    # scored prompts come from seed 0, pretraining prompts from seeds 1, 2, ...: never the same
    training = passkey_problems(tokenizer, prompt_tokens, pretrain_prompts, seed=1 + seed) if pretrain_steps else None
    for r in reductions:
        for router in ("random", "learned"):
            coda = routed_copy(model, routing, prompt_tokens, r, seed, router)
            found = share(keys_found(coda, problems.prompts, problems.answers))
            method = routed_method(r, router)
            rows.append(PasskeyResult(prompt_tokens, method, r, found, routed_needle_share(coda, problems)))
        if training is not None:
            distill_prefill(
                coda, training.windows, prompt_tokens, pretrain_steps, reduction_warmup=reduction_warmup, seed=seed
            )
            found = share(keys_found(coda, problems.prompts, problems.answers))
            warmup = f", reduction warm-up {reduction_warmup:g}" if reduction_warmup else ""
            method = f"coda r={r:g}, {pretrain_steps} steps of pass-key pretraining{warmup}"
            rows.append(PasskeyResult(prompt_tokens, method, r, found, routed_needle_share(coda, problems)))
        keep = math.ceil(prompt_tokens / r)
        found = share(keys_found(model, problems.prompts[:, -keep:], problems.answers))
        inside = [max(0, end - max(first, prompt_tokens - keep)) / (end - first) for first, end in problems.needles]
        rows.append(PasskeyResult(prompt_tokens, f"last n/{r:g} tokens", r, found, share(inside)))
    return rows


def share(values: list[bool] | list[float]) -> float:
    """The mean of ``values`` (the share of True ones)."""
    return sum(values) / len(values)
