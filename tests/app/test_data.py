"""Data loading: the built-in BBC split, every user file format, and every malformed case named clearly."""

import json

import pytest

from coda_adapters.app.data import (
    DataError,
    bbc_news_split,
    load_bbc_news,
    load_classification_data,
    load_corpus,
)


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_bbc_news_has_stable_labels_and_a_fixed_stratified_split():
    all_texts, all_labels, names = load_bbc_news(deduplicate=False)
    assert len(all_texts) == 2225 and names == ["business", "entertainment", "politics", "sports", "tech"]
    assert [all_labels.count(i) for i in range(5)] == [510, 386, 417, 511, 401]
    assert any("£" in text for text in all_texts)  # the one Windows-1252 file is decoded, not dropped
    texts, labels, _ = load_bbc_news()
    assert len(texts) == len(set(texts)) == len(set(all_texts)) == 2127
    first, second = bbc_news_split(), bbc_news_split()
    assert len(first.train.texts) == 1701 and len(first.test.texts) == 426
    assert first.test.texts == second.test.texts
    for label in range(5):  # stratified: each class keeps its share of the test set within one document
        share = first.test.labels.count(label) / 426
        assert abs(share - labels.count(label) / 2127) < 1 / 426 + 1e-9
    assert not set(first.test.texts) & set(first.train.texts)  # no test document has a copy in training


ROWS = [("good film", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("dull plot", "neg"), ("fine", "pos")]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_every_format_gives_the_same_examples_and_label_map(tmp_path, suffix):
    if suffix == ".jsonl":
        text = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        text = f"text{sep}label\n" + "".join(f"{t}{sep}{y}\n" for t, y in ROWS)
    path = write(tmp_path / f"d{suffix}", text)
    test = write(tmp_path / "t.jsonl", json.dumps({"text": "awful", "label": "neg"}) + "\n")
    data = load_classification_data(path, test=test)
    assert data.label_names == ["neg", "pos"]
    assert data.train.texts == [t for t, _ in ROWS] and data.train.labels == [1, 0, 1, 0, 1]
    assert data.test.labels == [0]


def test_integer_labels_sort_numerically_in_csv_and_jsonl(tmp_path):
    csv_path = write(tmp_path / "d.csv", "text,label\n" + "".join(f"t{i},{y}\n" for i, y in enumerate([10, 2, 2, 10])))
    jsonl = write(
        tmp_path / "d.jsonl",
        "".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate([10, 2, 2, 10])),
    )
    for path in (csv_path, jsonl):
        data = load_classification_data(path, test=path)
        assert data.label_names == ["2", "10"] and data.train.labels == [1, 0, 0, 1]


def test_custom_columns_and_test_size_split(tmp_path):
    rows = [{"body": f"text {i}", "y": i % 2} for i in range(20)]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = load_classification_data(path, text_column="body", label_column="y", test_size=0.25, seed=1)
    assert len(data.train.texts) == 15 and len(data.test.texts) == 5
    assert sorted(data.train.texts + data.test.texts) == sorted(r["body"] for r in rows)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.csv", "text,category\nhello,a\n", "d.csv, line 2: missing column\\(s\\) \\['label'\\]"),
        ("d.csv", "text,label\nhello,a\n  ,b\n", "d.csv, line 3: empty or non-text 'text'"),
        ("d.csv", "text,label\nhello,a\nworld,\n", "d.csv, line 3: 'label' must be a string or an integer"),
        ("d.csv", "text,label\nhello,a,extra\n", "d.csv, line 2: more fields than the header has"),
        ("d.csv", "", "d.csv: empty file"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1\n', "d.jsonl, line 2: not valid JSON"),
        ("d.jsonl", '["a", 1]\n', "d.jsonl, line 1: expected a JSON object"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n', "labels mix integers \\(line 1"),
        ("d.jsonl", '{"text": "a", "label": 1.5}\n', "line 1: 'label' must be a string or an integer"),
        ("d.jsonl", "\n\n", "d.jsonl: no records"),
        ("d.xml", "<a/>", "unknown file type '.xml'"),
    ],
)
def test_malformed_files_name_the_file_the_line_and_the_problem(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        load_classification_data(path, test=path)


def test_non_utf8_file_is_rejected_with_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError, match="d.csv, line 3: not valid UTF-8"):
        load_classification_data(str(path), test=str(path))


def test_test_label_unseen_in_training(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,x\nb,y\n")
    test = write(tmp_path / "test.csv", "text,label\nc,x\nd,z\n")
    with pytest.raises(DataError, match="test.csv, line 3: label 'z' does not occur in the training data"):
        load_classification_data(train, test=test)


def test_missing_file_and_bad_test_size(tmp_path):
    with pytest.raises(DataError, match="--data must be one of \\['bbc-news', 'bbc-needle'\\]"):
        load_classification_data(str(tmp_path / "nope.csv"))
    path = write(tmp_path / "d.csv", "text,label\na,x\nb,y\nc,x\n")
    with pytest.raises(DataError, match="--test-size must be in \\(0, 1\\)"):
        load_classification_data(path, test_size=1.5)


def test_corpus_from_text_file_and_column(tmp_path):
    text = write(tmp_path / "c.txt", "first document\n\nsecond document\n")
    assert load_corpus(text) == ["first document", "second document"]
    jsonl = write(tmp_path / "c.jsonl", json.dumps({"body": "only one"}) + "\n")
    assert load_corpus(jsonl, text_column="body") == ["only one"]
    assert len(load_corpus("bbc-news")) == 1701
    empty = write(tmp_path / "e.txt", "\n \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_corpus(empty)
