"""Routed prompt processing (prefill) on a real decoder LM, SmolLM2-135M: speed and quality.

Speed comes from :func:`coda_adapters.bench.run_benchmark` (the dense parallel adapter against CoDA at
each reduction, side by side). Quality is the effect of a routed prefill on what the model predicts
next, on continuous BBC News text: for each prompt the next ``continuation`` tokens are scored with the
KV cache the prefill left (teacher forcing, decoding densely as generation does), and the predicted
distributions are compared with those after a dense prefill by their KL divergence, ``KL(dense ||
routed)`` in nats per token. The routers and adapters are as :func:`get_coda_model` makes them
(untrained routers, adapters that start at zero), so this is the cost of routing before any CoDA
pretraining. For scale, the same comparison is made for the simplest way to spend the same budget:
keeping only the last ``n / r`` prompt tokens.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import check_int, check_number
from ..files import atomic_write, read_json_object, write_json
from .bench import BenchRow, format_table, run_benchmark
from .data import load_bbc_news
from .options import flag
from .passkey import PasskeyResult, measure_passkey
from .prefill_distill import PrefillRouting, distill_prefill, prefill_log_probs, routed_copy, routed_method

RESULTS_NAME = "results.json"
SUMMARY_NAME = "summary.json"  # of a run over several seeds (run_prefill_seeds)


@dataclass
class PrefillQuality:
    """Next-token agreement with the dense prefill for one prompt length and one way of cutting cost.

    ``method`` is ``"coda r=R"`` (routed prefill; ``", random router"``: the router's share drawn at random)
    or ``"last n/R tokens"`` (a truncated prompt).
    ``kl_next_token`` is the KL divergence at the first predicted token, ``kl_continuation`` the mean
    over all scored tokens; ``top1_agreement`` the share of scored positions where the most likely token
    is the same as after the dense prefill.
    """

    prompt_tokens: int
    method: str
    reduction: float
    kl_next_token: float
    kl_continuation: float
    top1_agreement: float


def continuous_text(tokenizer: Any, count: int, length: int, skip: int = 0) -> torch.Tensor:
    """``count`` consecutive windows of ``length`` tokens ``[count, length]`` of BBC News articles (all
    classes, in a fixed shuffled order) joined by blank lines, after the first ``skip`` windows."""
    texts, _, _ = load_bbc_news()
    ids: list[int] = []
    needed = (skip + count) * length
    for text in random.Random(0).sample(texts, len(texts)):
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            return torch.tensor(ids[skip * length : needed]).view(count, length)
    raise ValueError(f"BBC News has {len(ids)} tokens, fewer than {skip + count} windows of {length}")


def compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """``(KL at the first position, mean KL, top-1 agreement)`` of log-probabilities ``[batch, m + 1, vocab]``."""
    kl = (reference.exp() * (reference - other)).sum(-1)  # [batch, m + 1]
    agreement = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    return float(kl[:, 0].mean()), float(kl.mean()), float(agreement)


def measure_quality(
    model: nn.Module,
    tokenizer: Any,
    prompt_tokens: int,
    reductions: list[float],
    count: int,
    continuation: int,
    pretrain_steps: int = 0,
    pretrain_windows: int = 64,
    reduction_warmup: float = 0.0,
    routing: PrefillRouting | None = None,
    seed: int = 0,
) -> list[PrefillQuality]:
    """Routed (``routing``, the decoder recipe by default) and truncated prefills against the dense one on
    ``count`` windows of BBC News text; with ``pretrain_steps``, also the routed prefill after that many steps
    of :func:`distill_prefill` on ``pretrain_windows`` other windows of the same text (``seed``: the routers'
    initial weights and the windows' order)."""
    routing = routing or PrefillRouting()
    length = prompt_tokens + continuation
    text = continuous_text(tokenizer, count, length)
    prompts, rest = text[:, :prompt_tokens], text[:, prompt_tokens:]
    dense = prefill_log_probs(model, prompts, rest)
    windows = continuous_text(tokenizer, pretrain_windows, length, skip=count) if pretrain_steps else None
    rows = []
    for r in reductions:
        for router in ("random", "learned"):
            coda = routed_copy(model, routing, prompt_tokens, r, seed, router)
            routed = prefill_log_probs(coda, prompts, rest)
            rows.append(PrefillQuality(prompt_tokens, routed_method(r, router), r, *compare(dense, routed)))
        if pretrain_steps:
            distill_prefill(coda, windows, prompt_tokens, pretrain_steps, reduction_warmup=reduction_warmup, seed=seed)
            routed = prefill_log_probs(coda, prompts, rest)
            warmup = f", reduction warm-up {reduction_warmup:g}" if reduction_warmup else ""
            method = f"coda r={r:g}, {pretrain_steps} steps of prefill pretraining{warmup}"
            rows.append(PrefillQuality(prompt_tokens, method, r, *compare(dense, routed)))
        keep = math.ceil(prompt_tokens / r)
        truncated = prefill_log_probs(model, prompts[:, -keep:], rest)
        rows.append(PrefillQuality(prompt_tokens, f"last n/{r:g} tokens", r, *compare(dense, truncated)))
    return rows


def run_prefill_demo(
    out_dir: str | Path,
    *,
    lengths: tuple[int, ...] = (512, 1024),
    reductions: tuple[float, ...] = (3, 5),
    prompts: int = 8,
    continuation: int = 16,
    batch_size: int = 2,
    repeats: int = 3,
    pretrain_steps: int = 0,
    reduction_warmup: float = 0.0,
    passkey: int = 0,
    model_name: str = "smollm2",
    time_prefill: bool = True,
    routing: PrefillRouting | None = None,
    seed: int = 0,
    score_quality: bool = True,
    reuse_finished: bool = False,
) -> dict[str, Any]:
    """Time and score routed prefills (``routing``, the decoder recipe by default); with ``passkey``, also the
    pass-key probe on that many prompts per length (:mod:`.passkey`; its pretraining, with ``pretrain_steps``,
    reads pass-key prompts); ``score_quality=False`` skips the next-token KL on BBC text (and its pretraining);
    writes ``results.json`` and ``results.md`` to ``out_dir``. With ``reuse_finished``, a ``results.json``
    already in ``out_dir`` from the same settings is returned instead of running again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import resolve_model_path

    settings = dict(prompts=prompts, continuation=continuation, batch_size=batch_size, repeats=repeats)
    for name, value in settings.items():
        check_int(flag(name), value, low=1)
    check_int(flag("pretrain_steps"), pretrain_steps, low=0)
    check_int(flag("passkey"), passkey, low=0)
    check_int(flag("seed"), seed, low=0)
    check_number(flag("reduction_warmup"), reduction_warmup, low=0, high=1)
    routing = routing or PrefillRouting()
    settings.update(pretrain_steps=pretrain_steps, reduction_warmup=reduction_warmup, passkey=passkey, seed=seed)
    settings.update(routing=asdict(routing), model=model_name, lengths=list(lengths), reductions=list(reductions))
    settings.update(timing=time_prefill, quality=score_quality)
    if not reductions or any(r <= 1 for r in reductions):
        raise ValueError(f"--reductions must be reductions r > 1 to compare with the dense prefill, got {reductions}")
    out = Path(out_dir)
    finished = out / RESULTS_NAME
    if reuse_finished and finished.is_file():
        results = read_json_object(finished)
        if results.get("settings") == json.loads(json.dumps(settings)):
            return results
    out.mkdir(parents=True, exist_ok=True)
    speed = []
    for n in lengths if time_prefill else ():  # the window is a share of each length's budget
        speed += run_benchmark(
            model_name=model_name,
            seq_lens=[n],
            reductions=[1, *reductions],
            batch_size=batch_size,
            repeats=repeats,
            warmup=1,
            mixed=False,
            coda_fields=lambda r, n=n: routing.fields(n, r),
        )
    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    quality = [
        row
        for n in (lengths if score_quality else ())
        for row in measure_quality(
            model,
            tokenizer,
            n,
            list(reductions),
            prompts,
            continuation,
            pretrain_steps,
            reduction_warmup=reduction_warmup,
            routing=routing,
            seed=seed,
        )
    ]
    passkey_rows = []
    if passkey:
        for n in lengths:
            passkey_rows += measure_passkey(
                model,
                tokenizer,
                n,
                list(reductions),
                passkey,
                pretrain_steps,
                reduction_warmup=reduction_warmup,
                routing=routing,
                seed=seed,
            )
    results = {
        "model": model_name,
        "speed": [asdict(row) for row in speed],
        "quality": [asdict(row) for row in quality],
        "passkey": [asdict(row) for row in passkey_rows],
        "settings": settings,
    }
    write_json(out / RESULTS_NAME, results)
    report = format_prefill_report(speed, quality, passkey_rows)
    atomic_write(out / "results.md", lambda temporary: Path(temporary).write_text(report, encoding="utf-8"))
    return results


def format_prefill_report(
    speed: list[BenchRow], quality: list[PrefillQuality], passkey: list[PasskeyResult] = ()
) -> str:
    lines = []
    if speed:
        lines += ["## Prefill speed (forward with KV cache)", "", "```", format_table(speed), "```", ""]
    if quality:
        lines += [
            "## Next-token distribution against the dense prefill (KL in nats/token)",
            "",
            "| prompt tokens | method | KL next token | KL mean over continuation | top-1 agreement |",
            "|---:|---|---:|---:|---:|",
        ]
    for row in quality:
        lines.append(
            f"| {row.prompt_tokens} | {row.method} | {row.kl_next_token:.3f} | {row.kl_continuation:.3f} "
            f"| {100 * row.top1_agreement:.1f}% |"
        )
    if passkey:
        lines += ["", "## Pass-key retrieval (keys found by greedy decoding)", ""]
        lines += ["| prompt tokens | method | found | needle tokens run |", "|---:|---|---:|---:|"]
        lines += [
            f"| {r.prompt_tokens} | {r.method} | {100 * r.found:.0f}% | {100 * r.needle_routed:.0f}% |" for r in passkey
        ]
    return "\n".join(lines) + "\n"


# What the summary over seeds averages, per section of results.json
SEED_METRICS = {
    "quality": ("kl_next_token", "kl_continuation", "top1_agreement"),
    "passkey": ("found", "needle_routed"),
}


def run_prefill_seeds(
    out_dir: str | Path, seeds: list[int], *, time_prefill: bool = True, **options: Any
) -> dict[str, Any]:
    """:func:`run_prefill_demo` once per seed (``OUT/seed-<s>/``; a seed that finished there with the same
    settings is read back, so seeds can run apart, one per core, and be summarised after), then
    ``summary.json`` and ``summary.md`` in ``out_dir``: every quality and pass-key row's mean and sample
    standard deviation over the seeds, and each seed's value. Only the first seed is timed (its speed rows
    are the summary's): the cost of a routed prefill depends on the shapes, not on the seed's weights."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs two or more distinct seeds (or one, --seed), got {seeds}")
    out = Path(out_dir)
    runs = {
        seed: run_prefill_demo(
            out / f"seed-{seed}",
            seed=seed,
            reuse_finished=True,
            time_prefill=time_prefill and seed == seeds[0],
            **options,
        )
        for seed in seeds
    }
    summary = {
        "seeds": list(seeds),
        "speed": runs[seeds[0]]["speed"],
        **{section: summarise_rows(runs, section) for section in SEED_METRICS},
    }
    write_json(out / SUMMARY_NAME, summary)
    report = format_seed_summary(summary)
    atomic_write(out / "summary.md", lambda temporary: Path(temporary).write_text(report, encoding="utf-8"))
    return summary


def summarise_rows(runs: dict[int, dict[str, Any]], section: str) -> list[dict[str, Any]]:
    """Per row of ``section`` (the rows of every seed's run come in the same order, one per prompt length and
    method): each metric of :data:`SEED_METRICS` as ``{"mean", "std", "per_seed"}``."""
    per_seed_rows = {seed: run[section] for seed, run in runs.items()}
    summary = []
    for rows in zip(*per_seed_rows.values(), strict=True):
        names = {(row["prompt_tokens"], row["method"]) for row in rows}
        if len(names) != 1:
            raise ValueError(f"the seeds' {section} rows do not match: {sorted(names)}")
        entry: dict[str, Any] = {"prompt_tokens": rows[0]["prompt_tokens"], "method": rows[0]["method"]}
        for metric in SEED_METRICS[section]:
            values = [row[metric] for row in rows]
            per_seed = dict(zip(per_seed_rows, values, strict=True))
            entry[metric] = {"mean": statistics.mean(values), "std": statistics.stdev(values), "per_seed": per_seed}
        summary.append(entry)
    return summary


def format_seed_summary(summary: dict[str, Any]) -> str:
    """``summary.md``: the summary's rows as tables, mean ± sample std over the seeds (shares in %)."""

    def cell(value: dict[str, Any], scale: float = 1, digits: int = 3) -> str:
        return f"{scale * value['mean']:.{digits}f} ± {scale * value['std']:.{digits}f}"

    lines = [f"# SmolLM2 prefill, seeds {', '.join(map(str, summary['seeds']))} (mean ± std)", ""]
    if summary["speed"]:
        speed = format_table([BenchRow(**row) for row in summary["speed"]])
        lines += [f"## Prefill speed (seed {summary['seeds'][0]} only)", "", "```", speed, "```", ""]
    if summary["quality"]:
        lines += [
            "| prompt tokens | method | KL next token | KL mean over continuation | top-1 agreement (%) |",
            "|---:|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['prompt_tokens']} | {r['method']} | {cell(r['kl_next_token'])} | {cell(r['kl_continuation'])} "
            f"| {cell(r['top1_agreement'], 100, 1)} |"
            for r in summary["quality"]
        ]
        lines.append("")
    if summary["passkey"]:
        lines += [
            "| prompt tokens | method | keys found (%) | per seed | needle tokens run (%) |",
            "|---:|---|---:|---|---:|",
        ]
        for r in summary["passkey"]:
            per_seed = ", ".join(f"{100 * value:.0f}" for value in r["found"]["per_seed"].values())
            lines.append(
                f"| {r['prompt_tokens']} | {r['method']} | {cell(r['found'], 100, 1)} | {per_seed} "
                f"| {cell(r['needle_routed'], 100, 1)} |"
            )
    return "\n".join([*lines, ""])
