"""The benchmark: its cost model, its JSON contract, int8 quantisation, and the soft top-k report."""

import json
from types import SimpleNamespace

import pytest
import torch

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.app.bench import (
    build_variants,
    flop_ratio,
    layer_flops,
    lower_precision,
    quantize_frozen_linears,
    run_benchmark,
    soft_topk_report,
    time_interleaved,
    write_bench_json,
)
from coda_adapters.app.bench_models import RANDOM_MODELS, audio_frames_to_samples, bench_model, text_batch

from helpers import random_ids, tiny_model

MINILM = SimpleNamespace(hidden_size=384, intermediate_size=1536, num_attention_heads=12, model_type="bert")


def test_cost_model_matches_the_method_notes_for_minilm_at_512_tokens():
    """Method §6: a frozen dense layer against a CoDA layer (adapter 64) is about 3.1x at r = 3 and 5x at r = 5."""
    dense = layer_flops(MINILM, 512, None, None)
    assert dense / layer_flops(MINILM, 512, 171, 64) == pytest.approx(3.16, abs=0.01)
    assert dense / layer_flops(MINILM, 512, 103, 64) == pytest.approx(5.13, abs=0.01)
    # against the dense parallel adapter (the benchmark's reference) the ratio is a little higher
    assert flop_ratio(MINILM, 512, [512] * 8, 3, 64) > dense / layer_flops(MINILM, 512, 171, 64)
    assert flop_ratio(MINILM, 512, [512], 1, 64) == 1.0


def test_padding_makes_routing_cheaper_than_the_padded_length_suggests():
    full = flop_ratio(MINILM, 256, [256, 256], 3, 64)
    mixed = flop_ratio(MINILM, 256, [64, 256], 3, 64)
    assert mixed > full  # dense models compute padding, CoDA's k comes from the real length


def test_text_batch_is_real_text_cut_to_length():
    from transformers import AutoTokenizer

    from coda_adapters.app.assets import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    full = text_batch(tokenizer, 64, 4, mixed=False)
    assert full["input_ids"].shape == (4, 64) and bool(full["attention_mask"].all())
    mixed = text_batch(tokenizer, 64, 4, mixed=True)
    assert mixed["attention_mask"].sum(-1).tolist() == [16, 32, 48, 64]


def test_int8_quantisation_keeps_outputs_close_and_adapters_in_float():
    coda = get_coda_model(tiny_model("bert", hidden_size=64, intermediate_size=128), CodaConfig(reduction=2))
    ids = random_ids(2, 16)
    with torch.no_grad():
        before = coda(input_ids=ids).last_hidden_state
        quantize_frozen_linears(coda)
        after = coda(input_ids=ids).last_hidden_state
    layer = coda.conditional_layers()[0]
    assert "quantized" in type(layer.layer.attention.self.query).__module__
    assert isinstance(layer.adapter.down, torch.nn.Linear) and layer.adapter.down.weight.dtype == torch.float32
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_bf16_keeps_outputs_and_routing_close_and_every_weight_in_bfloat16():
    torch.manual_seed(0)
    coda = get_coda_model(tiny_model("bert", hidden_size=64, intermediate_size=128), CodaConfig(reduction=2))
    ids = random_ids(4, 32)
    with torch.no_grad():
        before, chosen_before = coda(input_ids=ids).last_hidden_state, coda.routing_trace()
        lower_precision(coda, "bf16")
        after, chosen_after = coda(input_ids=ids).last_hidden_state, coda.routing_trace()
    assert {p.dtype for p in coda.parameters()} == {torch.bfloat16} and after.dtype == torch.bfloat16
    assert (after.float() - before).abs().max() < 0.05 * before.abs().max()
    # the routers score in float32: bfloat16 hidden states change few of the choices
    for layer, old in chosen_before.items():
        same = (old.unsqueeze(-1) == chosen_after[layer].unsqueeze(-2)).any(-1).float().mean()
        assert same >= 0.8
    with pytest.raises(ValueError, match="--quantize must be one of"):
        lower_precision(coda, "fp16")


@pytest.mark.slow
def test_benchmark_rows_have_the_contract_keys(tmp_path):
    rows = run_benchmark(
        model_name="minilm", seq_lens=[32], reductions=[1, 3], batch_size=2, repeats=2, warmup=1, mixed=False
    )
    assert {row.variant for row in rows} == {"frozen", "lora-merged", "coda r=1", "coda r=3"}
    path = tmp_path / "bench.json"
    write_bench_json(rows, path)
    for row in json.loads(path.read_text()):
        for key in (
            "model",
            "seq_len",
            "batch_size",
            "reduction",
            "latency_ms",
            "examples_per_s",
            "speedup_vs_dense",
            "flop_ratio",
            "efficiency",
            "peak_mem_mb",
        ):
            assert key in row, key
        assert row["latency_ms"] > 0 and row["peak_mem_mb"] > 0
        assert row["runtime"] == "pytorch"  # the default runtime; rows of --runtime onnxruntime say so
        assert row["warm_calls"] == 0  # the default timing: each timed call follows another variant's
    dense = next(r for r in rows if r.variant == "coda r=1")
    assert dense.speedup_vs_dense == 1.0 and dense.flop_ratio == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seq_lens=[1024]), "above the model's maximum of 512"),
        (dict(batch_size=0), "--batch-size must be an int >= 1, got 0"),
        (dict(reductions=[3, 5]), "--reductions must include 1"),
        (dict(reductions=[1, 0.5]), "--reductions must be a finite number >= 1, got 0.5"),
        (dict(quantize="int4"), "--quantize must be one of"),
        (dict(quantize="bf16", runtime="onnxruntime"), "--quantize bf16 cannot be combined with --runtime onnxruntime"),
        (dict(warm_calls=-1), "--warm-calls must be an int >= 0, got -1"),
    ],
)
def test_bad_benchmark_arguments_fail_before_any_work(kwargs, message):
    arguments = dict(model_name="minilm", seq_lens=[32], reductions=[1, 3])
    with pytest.raises(ValueError, match=message):
        run_benchmark(**{**arguments, **kwargs})


def test_soft_topk_report_shows_exact_is_exact_and_the_paper_solver_is_not():
    report = soft_topk_report(n=128, batch=2, k=43, epsilons=(0.03, 1.0), repeats=3)
    small, large = report["errors"]
    assert small["exact_max_error"] < 1e-4 and large["exact_max_error"] < 1e-4
    assert small["coordinate_descent_max_error"] > 0.1  # far from the optimum at small epsilon
    assert set(report["microseconds"]) == {
        "exact",
        "exact +backward",
        "coordinate_descent",
        "coordinate_descent +backward",
    }


def test_cost_model_reads_grouped_query_attention_and_gated_mlps():
    """SmolLM2-135M: 9 query heads of 64 and 3 key/value heads, a SwiGLU MLP of 1,536; a routed layer
    also projects the skipped tokens' keys and values for the cache."""
    from transformers import LlamaConfig, T5Config

    smollm2 = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64
    )
    per_token = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert layer_flops(smollm2, 100, None, None) == 2 * 100 * per_token + 4 * 100 * 100 * 576
    skipped_kv = 2 * (100 - 34) * 2 * 576 * 192
    routed = 2 * 34 * per_token + 4 * 34 * 34 * 576 + 2 * 100 * 576 + 10 * 100 + skipped_kv
    assert layer_flops(smollm2, 100, 34, None) == routed
    t5 = T5Config(d_model=768, d_kv=64, d_ff=2048, num_heads=12, feed_forward_proj="gated-gelu")
    assert layer_flops(t5, 10, None, None) == 2 * 10 * (4 * 768 * 768 + 3 * 768 * 2048) + 4 * 100 * 768


def test_audio_lengths_give_the_requested_number_of_frames():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config()
    model = Wav2Vec2Model.__new__(Wav2Vec2Model)
    model.config = config
    for frames in (1, 49, 499):
        samples = audio_frames_to_samples(frames, config)
        assert int(model._get_feat_extract_output_lengths(torch.tensor(samples))) == frames
        assert int(model._get_feat_extract_output_lengths(torch.tensor(samples - 1))) == frames - 1
    assert audio_frames_to_samples(499, config) <= 160_000 < audio_frames_to_samples(500, config)  # 10 s


def test_vit_lengths_must_be_a_square_grid_plus_cls():
    with pytest.raises(ValueError, match="square grid of patches"):
        bench_model("vit-base").batch(100, 1, False)


@pytest.mark.slow
@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_bench_runs_every_random_weight_family(name):
    n = {"t5-base": 64, "vit-base": 50, "wav2vec2-base": 49, "wav2vec2-base-encoder": 49}[name]
    rows = run_benchmark(model_name=name, seq_lens=[n], reductions=[1, 3], batch_size=1, repeats=1, warmup=0)
    assert {row.variant for row in rows} == {"frozen", "lora-merged", "coda r=1", "coda r=3"}
    assert all(row.latency_ms > 0 and row.seq_len == n for row in rows)


def test_a_routing_recipe_reaches_the_routed_variants_only():
    variants = build_variants(tiny_model("bert"), [1, 3], 8, "none", False, lambda r: {"keep_first": 2, "keep_last": 1})
    assert variants["coda r=3"][1].coda_config == CodaConfig(reduction=3, bottleneck=8, keep_first=2, keep_last=1)
    assert variants["coda r=1"][1].coda_config == CodaConfig(reduction=1, bottleneck=8)


def test_each_variant_says_the_precision_its_frozen_layers_ran_in():
    variants = build_variants(tiny_model("bert"), [1, 3], 8, "int8", False)
    precisions = {label: variant.precision for label, (variant, _) in variants.items()}
    assert precisions == {
        "frozen": "int8",
        "lora-merged": "int8",
        "coda r=1": "int8",
        "coda r=3": "int8",
        "float dense": "float32",
    }
    for variant, model in variants.values():
        quantised = any("quantized" in type(module).__module__ for module in model.modules())
        assert quantised == (variant.precision == "int8")
    float_run = build_variants(tiny_model("bert"), [3], 8, "none", False)
    assert {variant.precision for variant, _ in float_run.values()} == {"float32"}


@pytest.mark.parametrize("warm_calls", [0, 2])
def test_each_timed_call_follows_its_own_warm_calls_in_rotating_rounds(warm_calls):
    """The call log of time_interleaved: the warm-up first, then per round every step once in a rotated order,
    each timed call right after ``warm_calls`` untimed calls of the same step."""
    log = []
    steps = {name: (lambda name=name: log.append(name)) for name in "abc"}
    times = time_interleaved(steps, repeats=3, warmup=1, warm_calls=warm_calls)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    per_call = warm_calls + 1
    rounds = [log[3 + i * 3 * per_call : 3 + (i + 1) * 3 * per_call] for i in range(3)]
    assert log[:3] == ["a", "b", "c"] and len(log) == 3 + 9 * per_call
    expected_orders = ["abc", "bca", "cab"]
    for calls, order in zip(rounds, expected_orders, strict=True):
        assert calls == [name for name in order for _ in range(per_call)]
