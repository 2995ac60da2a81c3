"""Progress for people: a live bar on a terminal, plain lines in a log.

On a terminal, tqdm draws its bar. When stderr goes to a file or a CI log, a bar's carriage returns
would make the log unreadable, so the same bar prints one plain line at most every ``log_every``
seconds, and one at the end, as ``transformers``' Trainer and ``accelerate`` do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str = "it",
    total: int | None = None,
    initial: int = 0,
    enabled: bool = True,
    leave: bool = True,
    log_every: float = 30.0,
) -> tqdm:
    """A tqdm bar over ``iterable``; without a terminal on stderr, a plain line every ``log_every`` seconds."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        initial=initial,
        disable=not enabled,
        leave=leave,
        dynamic_ncols=interactive,
        mininterval=0.1 if interactive else log_every,
        file=sys.stderr if interactive else _LineWriter(),
    )


class _LineWriter:
    """A file for tqdm that turns each redraw into one whole line on stderr."""

    def write(self, text: str) -> None:
        line = text.strip("\r\n")
        if line:
            print(line, file=sys.stderr, flush=True)

    def flush(self) -> None:
        sys.stderr.flush()
