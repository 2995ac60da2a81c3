"""`predict_file`: streamed batch prediction in input order, resumable after SIGKILL, sharded by RANK."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from coda_adapters.app.batch_predict import predict_file
from coda_adapters.app.classify import Encoded, load_classifier, predict_probabilities
from coda_adapters.app.data import DataError

from helpers import save_tiny_base, save_tiny_classifier

LABELS = ["business", "sport", "tech"]
MAX_LENGTH = 16
WORDS = ("the", "market", "rallied", "as", "a", "team", "won", "late", "goal", "while", "new", "chips", "shipped")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# a run slowed down after each chunk, so that the test can kill it half-way on any machine
SLOW_RUN = """
import sys, time
from coda_adapters.app import batch_predict
write = batch_predict.append_and_sync
batch_predict.append_and_sync = lambda handle, text: (write(handle, text), time.sleep(0.05))
adapter, source, out, chunk_size = sys.argv[1:]
batch_predict.predict_file(adapter, source, out, chunk_size=int(chunk_size), batch_size=16, show_progress=False)
"""
SHARD_RUN = """
import json, sys
from coda_adapters.app.batch_predict import predict_file
adapter, source, out = sys.argv[1:]
print(json.dumps(predict_file(adapter, source, out, chunk_size=10, batch_size=16, show_progress=False)))
"""
MEASURE = """
import resource, sys
from coda_adapters.app.batch_predict import predict_file
adapter, source, out = sys.argv[1:]
summary = predict_file(adapter, source, out, chunk_size=1024, batch_size=128, show_progress=False)
print(summary["rows_written"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A tiny random CoDA classifier saved as `coda train` saves one, over a tiny BERT on MiniLM's vocabulary."""
    root = tmp_path_factory.mktemp("classifier")
    return save_tiny_classifier(save_tiny_base(root / "base"), root / "clf", LABELS, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def reference(adapter):
    """Probabilities of `predict_probabilities` on whole lists of texts, the result to reproduce."""
    model, tokenizer, task = load_classifier(adapter)

    def probabilities(texts: list[str]) -> list[list[float]]:
        return predict_probabilities(model, Encoded(tokenizer, texts, None, task["max_length"]), 8)[0].tolist()

    return probabilities


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Texts of 1 to 24 words (many longer than MAX_LENGTH tokens), all different."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 25, (count,), generator=generator).tolist()
    picks = torch.randint(0, len(WORDS), (count, 24), generator=generator).tolist()
    return [
        f"{i} " + " ".join(WORDS[j] for j in row[:length])
        for i, (length, row) in enumerate(zip(lengths, picks, strict=True))
    ]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_same_predictions(actual: list[dict], expected: list[dict]) -> None:
    assert [row["line"] for row in actual] == [row["line"] for row in expected]
    assert [row.get("id") for row in actual] == [row.get("id") for row in expected]
    assert [row["label"] for row in actual] == [row["label"] for row in expected]
    for a, b in zip(actual, expected, strict=True):
        assert list(a["probabilities"]) == LABELS
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def as_rows(probabilities: list[list[float]], lines: list[int], ids: list | None = None) -> list[dict]:
    return [
        {
            "line": line,
            **({"id": ids[i]} if ids else {}),
            "label": LABELS[max(range(len(row)), key=row.__getitem__)],
            "probabilities": dict(zip(LABELS, row, strict=True)),
        }
        for i, (line, row) in enumerate(zip(lines, probabilities, strict=True))
    ]


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def test_one_line_per_row_in_input_order_equal_to_predict_probabilities(adapter, reference, tmp_path, capsys):
    texts = make_texts(61)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    summary = predict_file(adapter, source, tmp_path / "out.jsonl", batch_size=4, chunk_size=7)

    expected = as_rows(reference(texts), list(range(1, 62)), [f"doc-{i}" for i in range(61)])
    assert_same_predictions(read_lines(tmp_path / "out.jsonl"), expected)
    tokenizer = AutoTokenizer.from_pretrained(json.loads((adapter / "coda_task.json").read_text())["model"])
    longer = sum(len(ids) > MAX_LENGTH for ids in tokenizer(texts)["input_ids"])
    assert 0 < longer < len(texts)
    assert summary["rows"] == summary["rows_written"] == 61
    assert (summary["rows_skipped"], summary["truncated"]) == (0, longer)
    assert summary["rows_per_second"] > 0
    assert "row/s" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt"])
def test_csv_tsv_and_txt_inputs_give_their_line_numbers(adapter, reference, tmp_path, suffix):
    texts = make_texts(9)
    source = tmp_path / f"in{suffix}"
    if suffix == ".txt":
        source.write_text("\ufeff" + "\n".join(texts) + "\n", encoding="utf-8")  # a byte-order mark is dropped
        lines, ids = list(range(1, 10)), None
    else:
        separator = "," if suffix == ".csv" else "\t"
        body = [f'{i}{separator}"{text}"' for i, text in enumerate(texts)]
        source.write_text("\n".join([f"id{separator}text", *body]) + "\n", encoding="utf-8")
        lines, ids = list(range(2, 11)), [str(i) for i in range(9)]
    predict_file(adapter, source, tmp_path / "out.jsonl", chunk_size=4, show_progress=False)
    assert_same_predictions(read_lines(tmp_path / "out.jsonl"), as_rows(reference(texts), lines, ids))


def test_rerunning_a_finished_job_changes_nothing(adapter, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(20))
    predict_file(adapter, source, tmp_path / "out.jsonl", chunk_size=8, show_progress=False)
    before = (tmp_path / "out.jsonl").read_bytes()
    summary = predict_file(adapter, source, tmp_path / "out.jsonl", chunk_size=8, show_progress=False)
    assert (summary["rows_written"], summary["rows_skipped"]) == (0, 20)
    assert (tmp_path / "out.jsonl").read_bytes() == before


# --------------------------------------------------------------------------------------------------
# Crashes and resuming
# --------------------------------------------------------------------------------------------------


def test_resume_after_sigkill_gives_exactly_the_uninterrupted_output(adapter, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(400))
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN, adapter, source, out, "20"], env=ENV)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.stat().st_size > 0:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = out.read_bytes().count(b"\n")
    assert 0 < killed_at < 400

    summary = predict_file(adapter, source, out, chunk_size=20, batch_size=16, show_progress=False)
    assert summary["rows_skipped"] == killed_at
    assert summary["rows_written"] == 400 - killed_at
    predict_file(adapter, source, tmp_path / "whole.jsonl", chunk_size=20, batch_size=16, show_progress=False)
    assert_same_predictions(read_lines(out), read_lines(tmp_path / "whole.jsonl"))


def test_a_partly_written_last_line_is_cut_off_and_redone(adapter, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(30))
    whole = tmp_path / "whole.jsonl"
    predict_file(adapter, source, whole, chunk_size=8, show_progress=False)
    out = tmp_path / "out.jsonl"
    predict_file(adapter, source, out, chunk_size=8, show_progress=False)
    content = out.read_bytes()
    cut = len(b"".join(content.splitlines(keepends=True)[:11])) + 25  # 11 whole lines and part of the 12th
    out.write_bytes(content[:cut])

    summary = predict_file(adapter, source, out, chunk_size=8, show_progress=False)
    assert (summary["rows_skipped"], summary["rows_written"]) == (11, 19)
    # the rows after the cut are predicted in other batches (other padding): equal up to float rounding
    assert_same_predictions(read_lines(out), read_lines(whole))


def test_an_output_made_from_another_input_is_refused_until_overwrite(adapter, reference, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", make_texts(12, seed=1))
    out = tmp_path / "out.jsonl"
    predict_file(adapter, first, out, chunk_size=4, show_progress=False)
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:5]))  # as if killed after 5 rows
    texts = make_texts(12, seed=2)
    second = write_jsonl(tmp_path / "second.jsonl", texts)

    with pytest.raises(ValueError, match=r"out\.jsonl: made from a different input"):
        predict_file(adapter, second, out, chunk_size=4, show_progress=False)
    with pytest.raises(ValueError, match="different text column"):
        predict_file(adapter, first, out, text_column="id", chunk_size=4, show_progress=False)
    copy = shutil.copytree(adapter, tmp_path / "copy")
    with pytest.raises(ValueError, match="different adapter"):
        predict_file(copy, first, out, chunk_size=4, show_progress=False)
    assert len(read_lines(out)) == 5  # refused before touching it

    predict_file(adapter, second, out, chunk_size=4, show_progress=False, overwrite=True)
    ids = [f"doc-{i}" for i in range(12)]
    assert_same_predictions(read_lines(out), as_rows(reference(texts), list(range(1, 13)), ids))


def test_an_output_whose_last_line_is_not_the_matching_row_is_refused(adapter, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(12))
    out = tmp_path / "out.jsonl"
    predict_file(adapter, source, out, chunk_size=4, show_progress=False)
    rows = read_lines(out)[:6]
    rows[-1]["line"] = 9
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"out\.jsonl, line 6: a prediction for input line 9, but input row 6 is on"):
        predict_file(adapter, source, out, chunk_size=4, show_progress=False)


def test_an_existing_file_without_progress_record_is_not_appended_to(adapter, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(5))
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(ValueError, match=r"out\.jsonl: exists, but has no out\.jsonl\.progress\.json"):
        predict_file(adapter, source, out, show_progress=False)
    assert out.read_text() == "precious\n"
    with pytest.raises(ValueError, match="would overwrite the input"):
        predict_file(adapter, source, source, show_progress=False)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("in.jsonl", b'{"text": "fine"}\n{"text": "cut\n', r"line 2: not valid JSON"),
        ("in.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', r"line 2: missing column 'text'; found \['body'\]"),
        ("in.jsonl", b'{"text": "fine"}\n{"text": "  "}\n', r"line 2: empty or non-text 'text'"),
        ("in.jsonl", b'{"text": "fine"}\n{"text": 3}\n', r"line 2: empty or non-text 'text'"),
        ("in.jsonl", b'{"text": "fine"}\n\n{"text": "fine"}\n', r"line 2: empty line"),
        ("in.jsonl", b'{"text": "fine"}\n["text"]\n', r"line 2: expected a JSON object, got list"),
        ("in.txt", b"fine\n\xff\xfe\n", r"line 2: not valid UTF-8"),
        ("in.txt", b"fine\n   \nfine\n", r"line 2: empty line"),
        ("in.csv", b"id,text\n1,fine\n2,fine,extra\n", r"line 3: 3 field\(s\), but the header has 2"),
        ("in.csv", b"id,text\n1,\n", r"line 2: empty or non-text 'text'"),
        ("in.csv", b"id,body\n1,fine\n", r"line 2: missing column 'text'"),
        ("in.csv", b"id,text\n", r"no rows to predict"),
    ],
)
def test_bad_lines_are_errors_naming_the_file_and_line(adapter, tmp_path, name, content, problem):
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(source)) + ".*" + problem):
        predict_file(adapter, source, tmp_path / "out.jsonl", show_progress=False)
    assert not (tmp_path / "out.jsonl").exists()  # the whole input is checked before any prediction


# --------------------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "order"), [(2, [1, 0]), (6, [0, 5, 3, 2, 1, 4])])
def test_sharded_processes_write_parts_that_the_last_one_merges(adapter, tmp_path, world_size, order):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(23))  # chunks of 5, 5, 5, 5 and 3 rows; rank 5 of 6 has none
    whole = tmp_path / "whole.jsonl"
    predict_file(adapter, source, whole, chunk_size=5, show_progress=False)
    out = tmp_path / "out.jsonl"

    summaries = [
        predict_file(adapter, source, out, chunk_size=5, show_progress=False, rank=rank, world_size=world_size)
        for rank in order
    ]
    assert [s["merged"] for s in summaries] == [False] * (world_size - 1) + [True]
    assert sum(s["rows_written"] for s in summaries) == 23
    assert_same_predictions(read_lines(out), read_lines(whole))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.jsonl", "out.jsonl", "out.jsonl.progress.json", "whole.jsonl", "whole.jsonl.progress.json"]
    )
    again = predict_file(adapter, source, out, chunk_size=5, show_progress=False, rank=0, world_size=world_size)
    assert (again["rows_written"], again["merged"]) == (0, False)
    with pytest.raises(ValueError, match="needs WORLD_SIZE=1"):
        predict_file(adapter, source, out, overwrite=True, show_progress=False, rank=0, world_size=world_size)


def test_concurrent_processes_launched_with_rank_and_world_size_merge_once(adapter, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(200))
    out = tmp_path / "out.jsonl"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SHARD_RUN, adapter, source, out],
            env={**ENV, "RANK": str(rank), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    summaries = [json.loads(process.communicate(timeout=120)[0]) for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert sorted(s["merged"] for s in summaries) == [False, True]
    predict_file(adapter, source, tmp_path / "whole.jsonl", chunk_size=10, batch_size=16, show_progress=False)
    assert_same_predictions(read_lines(out), read_lines(tmp_path / "whole.jsonl"))
    assert not list(tmp_path.glob("out.jsonl.part-*"))


def test_sharding_is_read_from_the_environment(adapter, tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(10))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = predict_file(adapter, source, tmp_path / "out.jsonl", chunk_size=3, show_progress=False)
    assert (summary["rank"], summary["world_size"], summary["rows_written"]) == (1, 2, 4)  # rows 4-6 and 10
    assert [row["line"] for row in read_lines(tmp_path / "out.jsonl.part-1")] == [4, 5, 6, 10]
    with pytest.raises(ValueError, match="was started with WORLD_SIZE > 1"):
        predict_file(adapter, source, tmp_path / "out.jsonl", chunk_size=3, show_progress=False, world_size=1, rank=0)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def peak_memory_kib(adapter: Path, rows: int, directory: Path) -> int:
    """Predict ``rows`` texts in a fresh process; its peak resident memory."""
    source = directory / f"in-{rows}.jsonl"
    with open(source, "w", encoding="utf-8") as handle:
        for start in range(0, rows, 10_000):
            for i, text in enumerate(make_texts(min(10_000, rows - start), seed=start)):
                handle.write(json.dumps({"id": start + i, "text": text}) + "\n")
    command = [sys.executable, "-c", MEASURE, adapter, source, directory / f"out-{rows}.jsonl"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, check=True)
    written, peak = map(int, result.stdout.split())
    assert written == rows
    return peak


@pytest.mark.slow
def test_memory_does_not_grow_with_the_input(adapter, tmp_path):
    small = peak_memory_kib(adapter, 1_000, tmp_path)
    large = peak_memory_kib(adapter, 100_000, tmp_path)
    assert large < small * 1.1 + 30 * 1024, (
        f"peak RSS {small / 1024:.0f} MiB for 1,000 rows, {large / 1024:.0f} MiB for 100,000"
    )


def test_coda_predict_with_out_streams_the_file_and_resumes(adapter, reference, tmp_path, capsys):
    from coda_adapters.app.cli import main

    texts = make_texts(40)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    out = tmp_path / "preds.jsonl"
    argv = ["predict", "--adapter", str(adapter), "--file", str(source), "--out", str(out), "--chunk-size", "16"]
    assert main(argv) == 0
    assert f"{len(texts)} rows predicted, 0 done before" in capsys.readouterr().err
    ids = [f"doc-{i}" for i in range(len(texts))]
    assert_same_predictions(read_lines(out), as_rows(reference(texts), list(range(1, len(texts) + 1)), ids))
    assert main(argv) == 0  # a finished job is left as it is
    assert main(["predict", "--adapter", str(adapter), "--out", str(out), "some text"]) == 2
    assert "give --file and no texts" in capsys.readouterr().err
