"""The SmolLM2 prefill demo's measurements, on a tiny random Llama."""

import json
import re
import statistics

import pytest
import torch

from coda_adapters import CodaConfig, CodaModel, get_coda_model
from coda_adapters.app.prefill import SEED_METRICS, compare, measure_quality, run_prefill_seeds, summarise_rows
from coda_adapters.app.prefill_distill import PrefillRouting, distill_prefill, prefill_log_probs, routed_copy

from helpers import tiny_causal_lm


def test_prefill_then_cached_continuation_equals_one_dense_forward():
    model = tiny_causal_lm()
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(input_ids=ids).logits.log_softmax(-1)
    got = prefill_log_probs(model, ids[:, :12], ids[:, 12:])
    torch.testing.assert_close(got, whole[:, 11:], atol=1e-5, rtol=0)
    kl_first, kl_mean, agreement = compare(got, got)
    assert abs(kl_first) < 1e-6 and abs(kl_mean) < 1e-6 and agreement == 1.0


def test_quality_rows_compare_routing_and_truncation_with_the_dense_prefill(minilm_tokenizer):
    model = tiny_causal_lm(vocab_size=minilm_tokenizer.vocab_size)
    rows = measure_quality(model, minilm_tokenizer, prompt_tokens=24, reductions=[3], count=2, continuation=4)
    assert [row.method for row in rows] == ["coda r=3, random router", "coda r=3", "last n/3 tokens"]
    for row in rows:
        assert row.kl_next_token >= 0 and row.kl_continuation >= 0 and 0 <= row.top1_agreement <= 1
    routed = get_coda_model(tiny_causal_lm(vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=1))
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    dense = prefill_log_probs(model, ids[:, :12], ids[:, 12:])
    assert compare(dense, prefill_log_probs(routed, ids[:, :12], ids[:, 12:]))[1] < 1e-6  # r = 1 is the dense model


def test_the_random_router_baseline_keeps_the_ends_and_draws_the_rest_once_for_every_layer():
    model = tiny_causal_lm(num_hidden_layers=3).eval()
    routing = PrefillRouting(keep_first=2, window_share=0.5)  # 30 tokens at r = 3: k = 10, 2 first and 5 last
    coda = routed_copy(model, routing, prompt_tokens=30, reduction=3, seed=0, router="random")
    assert not any(isinstance(m, CodaModel) for m in model.modules()) and coda.model is not model  # a copy
    ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(0))
    draws = set()
    for _ in range(5):
        with torch.inference_mode():
            coda(input_ids=ids, logits_to_keep=1)
        traces = [trace[0] for trace in coda.routing_trace().values()]
        assert len(traces) == 3 and all(torch.equal(trace, traces[0]) for trace in traces)
        chosen = frozenset(traces[0].tolist())
        assert len(chosen) == 10 and {0, 1, 25, 26, 27, 28, 29} <= chosen
        draws.add(chosen)
    assert len(draws) > 1  # the other 3 of the 23 middle tokens are drawn anew (all 5 alike: p < 1e-12)


def test_prefill_pretraining_lowers_the_kl_and_trains_only_routers_and_adapters():
    model = tiny_causal_lm(initializer_range=0.3)
    coda = get_coda_model(model, CodaConfig(reduction=3, bottleneck=8))
    frozen = {name: p.detach().clone() for name, p in coda.named_parameters() if not p.requires_grad}
    windows = torch.randint(3, 100, (4, 20), generator=torch.Generator().manual_seed(0))
    losses = distill_prefill(coda, windows, prompt_tokens=16, steps=30, lr=1e-2)
    assert all(torch.equal(p, frozen[name]) for name, p in coda.named_parameters() if not p.requires_grad)
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])


def test_prefill_pretraining_with_a_warmup_starts_dense_and_ends_at_r():
    coda = get_coda_model(tiny_causal_lm(initializer_range=0.3), CodaConfig(reduction=3, bottleneck=8))
    seen = []
    coda.model.model.register_forward_pre_hook(
        lambda module, args: seen.append(coda.reduction) if coda.training else None
    )
    windows = torch.randint(3, 100, (4, 20), generator=torch.Generator().manual_seed(0))
    losses = distill_prefill(coda, windows, prompt_tokens=16, steps=6, lr=1e-2, reduction_warmup=0.5)
    assert seen[0] == 1.0 and max(seen) == 3.0 and seen == sorted(seen)
    assert losses[0] < 1e-6  # at r = 1 with fresh adapters the routed prefill is the dense one
    assert coda.reduction == 3.0 and not coda.training


def test_the_decoder_recipe_keeps_the_sink_and_a_window_that_is_a_share_of_each_prompts_budget():
    routing = PrefillRouting(keep_first=4, window_share=0.75)
    assert routing.config(1024, 3) == CodaConfig(reduction=3, keep_first=4, keep_last=256, share_selection=True)
    assert routing.config(512, 5).keep_last == 77  # floor(0.75 * ceil(512 / 5) = 103)
    paper = PrefillRouting(keep_first=0, window_share=0, share_selection=False)
    assert paper.config(512, 3) == CodaConfig(reduction=3)
    for settings, message in [
        (dict(window_share=1.5), "window_share must be a finite number >= 0 and <= 1, got 1.5"),
        (dict(keep_first=-1), "keep_first must be an int >= 0, got -1"),
        (dict(share_selection=1), "share_selection must be True or False, got 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            PrefillRouting(**settings)


def test_the_decoder_recipe_routes_a_prompt_in_one_selection_with_its_ends(minilm_tokenizer):
    """What measure_quality builds for a 24-token prompt at r = 3: k = 8, the first 2 and the last 4 kept, every
    layer the same tokens."""
    model = tiny_causal_lm(vocab_size=minilm_tokenizer.vocab_size)
    coda = get_coda_model(model, PrefillRouting(keep_first=2, window_share=0.5).config(24, 3))
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        coda(input_ids=ids)
    traces = list(coda.routing_trace().values())
    assert all(torch.equal(trace, traces[0]) for trace in traces)
    for row in traces[0].tolist():
        assert len(row) == 8 and {0, 1, 20, 21, 22, 23} <= set(row)


@pytest.fixture
def tiny_lm_dir(tmp_path, minilm_tokenizer):
    """A tiny random Llama saved with MiniLM's tokenizer: a local model directory for ``model_name``."""
    lm = tmp_path / "lm"
    tiny_causal_lm(vocab_size=minilm_tokenizer.vocab_size).save_pretrained(lm)
    minilm_tokenizer.save_pretrained(lm)
    return str(lm)


def test_prefill_over_seeds_summarises_every_row_and_keeps_the_seeds_finished_with_the_same_settings(
    tmp_path, tiny_lm_dir
):
    options = dict(lengths=(128,), reductions=(3,), prompts=2, continuation=2, passkey=2, model_name=tiny_lm_dir)
    out = tmp_path / "out"
    summary = run_prefill_seeds(out, [0, 1], time_prefill=False, **options)

    runs = [json.loads((out / f"seed-{seed}" / "results.json").read_text()) for seed in (0, 1)]
    for section, metrics in SEED_METRICS.items():
        assert [row["method"] for row in summary[section]] == [row["method"] for row in runs[0][section]]
        for i, row in enumerate(summary[section]):
            for metric in metrics:
                values = [run[section][i][metric] for run in runs]
                assert row[metric]["mean"] == pytest.approx(statistics.mean(values))
                assert row[metric]["std"] == pytest.approx(statistics.stdev(values))
    assert any(row["kl_next_token"]["std"] > 0 for row in summary["quality"])  # the seeds' routers differ
    assert "coda r=3, random router" in (out / "summary.md").read_text()

    runs[0]["quality"][0]["kl_next_token"] = 123.0  # a finished seed is read back, not run again
    (out / "seed-0" / "results.json").write_text(json.dumps(runs[0]))
    again = run_prefill_seeds(out, [0, 1], time_prefill=False, **options)
    assert again["quality"][0]["kl_next_token"]["per_seed"][0] == 123.0
    other = run_prefill_seeds(out, [0, 1], time_prefill=False, **{**options, "continuation": 3})
    assert other["quality"][0]["kl_next_token"]["per_seed"][0] != 123.0  # other settings: run again

    with pytest.raises(ValueError, match=re.escape("--seeds needs two or more distinct seeds (or one, --seed)")):
        run_prefill_seeds(out, [1, 1], **options)
    mismatched = {
        0: {"passkey": [{"prompt_tokens": 128, "method": "dense"}]},
        1: {"passkey": [{"prompt_tokens": 128, "method": "coda r=3"}]},
    }
    with pytest.raises(ValueError, match="the seeds' passkey rows do not match"):
        summarise_rows(mismatched, "passkey")


def test_prefill_over_seeds_times_only_the_first_seed(tmp_path, tiny_lm_dir):
    options = dict(lengths=(64,), reductions=(3,), prompts=2, continuation=2, repeats=1, model_name=tiny_lm_dir)
    out = tmp_path / "out"
    summary = run_prefill_seeds(out, [1, 0], score_quality=False, **options)

    runs = {seed: json.loads((out / f"seed-{seed}" / "results.json").read_text()) for seed in (0, 1)}
    assert runs[1]["settings"]["timing"] and runs[1]["speed"]
    assert not runs[0]["settings"]["timing"] and runs[0]["speed"] == []
    assert summary["speed"] == runs[1]["speed"]
    assert "## Prefill speed (seed 1 only)" in (out / "summary.md").read_text()


def test_prefill_takes_one_seed_or_several():
    from coda_adapters.app.cli import build_parser

    assert build_parser().parse_args(["prefill", "--seed", "2"]).seeds == [2]
    assert build_parser().parse_args(["prefill", "--seeds", "0", "1", "2"]).seeds == [0, 1, 2]
