"""The `coda` command line end to end, on a CI-sized slice of BBC News, through real subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from coda_adapters.app.data import bbc_news_split

QUICK = [
    *("--max-length", "48", "--max-train-examples", "240", "--batch-size", "16", "--epochs", "3", "--lr", "3e-3"),
    *("--min-steps", "0"),
]


def coda(*args, check=True, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "coda_adapters", *map(str, args)], capture_output=True, text=True, env=env, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"coda {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """pretrain -> train --init, once for the module."""
    root = tmp_path_factory.mktemp("cli")
    pretrained = coda("pretrain", "--steps", "4", "--batch-size", "4", "--max-length", "32", "--out", root / "pre")
    (root / "pretrain-stdout.txt").write_text(pretrained.stdout)
    trained = coda("train", *QUICK, "--init", root / "pre", "--out", root / "clf")
    (root / "train-stdout.txt").write_text(trained.stdout)
    return root


@pytest.mark.slow
def test_pretrain_by_default_pretrains_the_routers_layer_wise_and_says_how_to_fine_tune_them(trained):
    # the defaults are the settings measured best (README, "CoDA pretraining on bbc-needle"): layer-wise targets,
    # routers only, half the steps of warm-up; at the default router rate fine-tuning barely moves them
    files = sorted(p.name for p in (trained / "pre").iterdir())
    assert files == ["coda_config.json", "coda_model.safetensors", "pretrain_metrics.json"]
    names = load_file(trained / "pre" / "coda_model.safetensors")
    assert len(names) == 6 and all(n.endswith(".router.weight") for n in names)
    config = json.loads((trained / "pre" / "pretrain_metrics.json").read_text())["pretrain_config"]
    assert (config["objective"], config["routers_only"], config["reduction_warmup"]) == ("layerwise", True, 0.5)
    assert f"coda train --init {trained / 'pre'} --router-lr-scale 30" in (trained / "pretrain-stdout.txt").read_text()
    # fine-tuned at the default rate (the fixture's `coda train --init`), which says what the README recommends
    assert "note: pretrained routers barely move at --router-lr-scale 1" in (trained / "train-stdout.txt").read_text()


@pytest.mark.slow
def test_pretrain_with_no_routers_only_trains_and_saves_the_adapters_too(tmp_path):
    coda(
        "pretrain", "--steps", "2", "--batch-size", "2", "--max-length", "16", "--objective", "distill",
        "--no-routers-only", "--out", tmp_path,
    )  # fmt: skip
    names = load_file(tmp_path / "coda_model.safetensors")
    assert any(".router." in n for n in names) and any(".adapter." in n for n in names)
    assert all(".router." in n or ".adapter." in n for n in names)
    assert json.loads((tmp_path / "pretrain_metrics.json").read_text())["pretrain_config"]["routers_only"] is False


@pytest.mark.slow
def test_train_writes_adapter_metrics_and_beats_the_majority_class(trained):
    out = trained / "clf"
    assert {"coda_config.json", "coda_model.safetensors", "coda_task.json", "metrics.json"} <= {
        p.name for p in out.iterdir()
    }
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "accuracy",
        "macro_f1",
        "per_class",
        "reduction",
        "train_seconds",
        "eval_examples_per_second",
        "coda_config",
        "train_config",
        "versions",
        "confusion_matrix",
        "init",
    ):
        assert key in metrics, key
    test_labels = bbc_news_split().test.labels
    majority = max(test_labels.count(label) for label in set(test_labels)) / len(test_labels)
    assert metrics["accuracy"] > majority + 0.1
    assert metrics["reduction"] == 3.0 and metrics["eval_examples"] == len(test_labels)
    assert metrics["versions"]["transformers"] == "5.23.0"


@pytest.mark.slow
def test_eval_reproduces_the_training_metrics(trained):
    result = coda("eval", "--adapter", trained / "clf", "--json", trained / "eval.json")
    again = json.loads((trained / "eval.json").read_text())
    first = json.loads((trained / "clf" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(first["accuracy"])
    assert again["confusion_matrix"] == first["confusion_matrix"]
    assert "confusion matrix" in result.stdout


@pytest.mark.slow
def test_predict_gives_a_label_and_probabilities_per_text(trained):
    texts = ["The striker scored twice as the club won the cup final.", "Shares fell as the bank cut its forecast."]
    result = coda("predict", "--adapter", trained / "clf", "--json", *texts)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    for row in rows:
        assert set(row["probabilities"]) == {"business", "entertainment", "politics", "sports", "tech"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)


@pytest.mark.slow
def test_explain_shows_routed_tokens_and_writes_html_and_png(trained):
    text = "The government announced new taxes on fuel today."
    result = coda("explain", "--adapter", trained / "clf", text, "--out", trained / "routing.html")
    assert "layer 0 (" in result.stdout and "[[CLS]]" in result.stdout
    page = (trained / "routing.html").read_text()
    assert "class='tok kept'" in page and "layer&nbsp;5" in page
    coda("explain", "--adapter", trained / "clf", text, "--out", trained / "routing.png")
    assert (trained / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    args = [
        "train",
        "--reduction",
        "3",
        "--max-length",
        "32",
        "--max-train-examples",
        "96",
        "--batch-size",
        "8",
        "--epochs",
        "4",
        "--min-steps",
        "0",
        "--val-size",
        "0",
    ]
    coda(*args, "--out", tmp_path / "whole")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "coda_adapters", *args, "--out", str(tmp_path / "cut")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    first = tmp_path / "cut" / "checkpoints" / "epoch-1" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "cut" / "metrics.json").exists(), "the run finished before it could be killed"
    coda(*args, "--out", tmp_path / "cut", "--resume")
    whole = load_file(tmp_path / "whole" / "coda_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "coda_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert (whole[name] - resumed[name]).abs().max() <= 1e-6, name


def test_bad_arguments_are_one_line_errors(tmp_path):
    result = coda("train", "--reduction", "0.5", "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "reduction must be a finite number >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    result = coda("eval", "--adapter", tmp_path / "missing", check=False)
    assert result.returncode == 2 and "coda_task.json" in result.stderr
    result = coda("bench", "--seq-lens", "1024", check=False)
    assert result.returncode == 2 and "above the model's maximum of 512 positions" in result.stderr
    result = coda("bench", "--batch-size", "0", check=False)
    assert result.returncode == 2 and "--batch-size must be an int >= 1, got 0" in result.stderr
    result = coda("bench", "--model", "no-such-model", check=False)
    assert result.returncode == 2 and "bundled model name" in result.stderr


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "coda").exists()


@pytest.mark.slow
def test_experiment_trains_every_row_and_writes_the_table(tmp_path):
    result = coda("experiment", "--preset", "smoke", "--out", tmp_path)
    table = (tmp_path / "results.md").read_text()
    for name in ("Dense parallel adapter (r=1)", "CoDA r=3 + pretraining", "LoRA (peft, rank 8)"):
        assert name in table and name in result.stdout
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    dense = next(r for r in rows if r["name"].startswith("Dense"))
    assert dense["inference_speedup"] == 1.0 and dense["training_speedup"] == 1.0
    assert (tmp_path / "coda-r-3-pretraining" / "pretrain" / "coda_model.safetensors").is_file()
    again = coda("experiment", "--preset", "smoke", "--out", tmp_path)  # finished rows are kept
    assert again.stdout.count("done before, kept") == 3


def test_experiment_presets_offered_by_the_cli_are_the_library_presets():
    from coda_adapters.app.cli import build_parser
    from coda_adapters.app.experiment import PRESETS

    experiment = build_parser()._subparsers._group_actions[0].choices["experiment"]
    preset = next(action for action in experiment._actions if action.dest == "preset")
    assert sorted(preset.choices) == sorted(PRESETS)
