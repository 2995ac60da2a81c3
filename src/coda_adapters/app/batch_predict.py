"""Batch prediction over files of any size: streamed, in input order, resumable after a crash.

``predict_file`` backs ``coda predict --adapter DIR --file big.jsonl --out preds.jsonl``.

Input
    JSONL (a ``text_column`` field per line), CSV/TSV (a header line naming the columns) or ``.txt``
    (one text per line). The file is read line by line, twice: a first pass checks every line (so a
    bad line 9,000,000 fails at once, not after hours of work) and counts the rows; the second
    predicts. A blank line, malformed JSON, a missing column or an empty text is a ``DataError``
    naming the file and the line.

Output
    One JSON line per input row, in input order::

        {"line": 7, "id": "a-12", "label": "sport", "probabilities": {"business": 0.01, "sport": 0.97, ...}}

    ``line`` is the row's 1-based line number in the input (for CSV/TSV the header is line 1, and a
    quoted field spanning lines gives its record's last line); ``id`` is copied when the input has an
    ``id`` column; ``probabilities`` follow the classifier's label order. Texts longer than the
    classifier's ``max_length`` tokens are truncated, and counted in the summary.

Memory
    Rows are read, predicted and written ``chunk_size`` at a time; within a chunk they are sorted by
    token length so batches carry little padding, and written back in input order. Memory does not
    grow with the file.

Crash safety and resume
    The output is flushed and fsynced after each chunk. Beside it, ``<out>.progress.json`` records
    what the output is made from: the input's path, size and a hash of its first and last MiB, the
    adapter directory and a hash of its files, and the text column. Rerunning the same command after a
    crash (even SIGKILL) cuts off a partially written last line, counts the complete lines, checks
    that the last one is the prediction for the matching input row, and carries on from the next row,
    so that the finished output has exactly one line per input row. An output made from another
    input or adapter, or one without a progress file, is refused (``ValueError`` naming the file);
    ``overwrite=True`` (``--restart``) starts over. A finished run's progress file stays, so a rerun
    of a finished job does nothing.

Several processes on one machine
    With ``RANK`` and ``WORLD_SIZE`` set (as ``accelerate launch`` and ``torchrun`` do, or by hand:
    ``RANK=1 WORLD_SIZE=4 coda predict ...``), process ``r`` of ``W`` predicts chunks ``r``, ``r + W``,
    ``r + 2W``, ... into ``<out>.part-r`` (each part resumable as above). Whichever process finishes
    last merges the parts into ``<out>``, under a lock on the output directory, and deletes them; no
    process waits for another, so one that crashes only delays the merge until it is rerun. All
    processes must use the same ``chunk_size``. ``overwrite`` is refused with ``WORLD_SIZE > 1``:
    processes start at different times, so one could delete a part another has just begun. Each
    process reads the whole input (to find its chunks) and runs on the CPU; give each process its own
    threads (``OMP_NUM_THREADS``; ``torchrun`` sets 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ..config import check_int
from ..files import atomic_write, read_json_object, write_json
from .classify import TASK_NAME, Encoded, load_classifier, predict_probabilities, read_task
from .data import Row, count_rows, iter_rows
from .options import flag
from .progress import progress_bar

PROGRESS_SUFFIX = ".progress.json"
DIGEST_BYTES = 1 << 20  # the input is identified by its size and a hash of its first and last MiB
IDENTITY_KEYS = ("input", "input_size", "input_digest", "adapter", "adapter_digest", "text_column")
SHARD_KEYS = ("rank", "world_size", "chunk_size")


# --------------------------------------------------------------------------------------------------
# Sharding across processes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world_size`` predicts chunks ``rank``, ``rank + world_size``, ..."""

    rank: int
    world_size: int
    chunk_size: int

    @classmethod
    def from_environment(cls, rank: int | None, world_size: int | None, chunk_size: int) -> Shard:
        rank = _environment_int("RANK", 0) if rank is None else rank
        world_size = _environment_int("WORLD_SIZE", 1) if world_size is None else world_size
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"RANK must be in [0, WORLD_SIZE) and WORLD_SIZE >= 1, got {rank!r} and {world_size!r}")
        return cls(rank, world_size, chunk_size)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def target(self, output: Path) -> Path:
        """The file this process writes: the output itself, or its part when sharded."""
        return part_path(output, self.rank) if self.sharded else output

    def own_rows(self, rows: Iterable[Row]) -> Iterator[Row]:
        for index, row in enumerate(rows):
            if (index // self.chunk_size) % self.world_size == self.rank:
                yield row

    def own_count(self, total: int) -> int:
        chunks = range(self.rank, -(-total // self.chunk_size), self.world_size)
        return sum(min(self.chunk_size, total - chunk * self.chunk_size) for chunk in chunks)

    def settings(self) -> dict[str, int]:
        return {"rank": self.rank, "world_size": self.world_size, "chunk_size": self.chunk_size}


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}")


def progress_path(target: Path) -> Path:
    return target.with_name(target.name + PROGRESS_SUFFIX)


def chunked(rows: Iterable[Row], size: int, start: int) -> Iterator[list[Row]]:
    """Lists of ``size`` rows, the first one shorter when resuming at row ``start``.

    Chunks end at multiples of ``size`` counted from the first row, so a resumed run batches every
    later chunk exactly as an uninterrupted run does (and gets the same numbers).
    """
    chunk: list[Row] = []
    for index, row in enumerate(rows, start=start + 1):
        chunk.append(row)
        if index % size == 0:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------------
# What an output is made from
# --------------------------------------------------------------------------------------------------


def run_identity(adapter_dir: Path, input_path: Path, text_column: str) -> dict[str, Any]:
    """The facts that decide the predictions: a resumed run must share every one with the first run."""
    size = input_path.stat().st_size
    return {
        "input": str(input_path.resolve()),
        "input_size": size,
        "input_digest": input_digest(input_path, size),
        "adapter": str(adapter_dir.resolve()),
        "adapter_digest": adapter_digest(adapter_dir),
        "text_column": text_column,
    }


def input_digest(path: Path, size: int) -> str:
    """SHA-256 of the first and last MiB: catches a replaced, edited or appended-to input without
    reading gigabytes (together with the size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(DIGEST_BYTES))
        if size > DIGEST_BYTES:
            handle.seek(max(DIGEST_BYTES, size - DIGEST_BYTES))
            digest.update(handle.read(DIGEST_BYTES))
    return digest.hexdigest()


def adapter_digest(adapter_dir: Path) -> str:
    """SHA-256 of the classifier's own files: a retrained adapter in the same directory is another model."""
    digest = hashlib.sha256()
    for name in (TASK_NAME, CONFIG_NAME, WEIGHTS_NAME):
        path = adapter_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def read_progress(target: Path) -> dict[str, Any] | None:
    path = progress_path(target)
    return read_json_object(path) if path.is_file() else None


def check_same_run(target: Path, recorded: dict[str, Any], expected: dict[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        if recorded.get(key) != expected[key]:
            raise ValueError(
                f"{target}: made from a different {key.replace('_', ' ')} ({recorded.get(key)!r}, now "
                f"{expected[key]!r}; see {progress_path(target)}); pass overwrite=True (--restart) to start "
                "over, or choose another output"
            )


# --------------------------------------------------------------------------------------------------
# Resuming an output
# --------------------------------------------------------------------------------------------------


def prepare_output(target: Path, expected: dict[str, Any], keys: Iterable[str]) -> tuple[int, int | None]:
    """Start ``target`` or check and repair it for resuming: ``(complete lines, input line of the last)``."""
    recorded = read_progress(target)
    if recorded is None and target.exists():
        raise ValueError(
            f"{target}: exists, but has no {progress_path(target).name}, so it cannot be resumed; pass "
            "overwrite=True (--restart) to replace it, or choose another output"
        )
    if recorded is None or _is_empty(target):
        # Nothing predicted yet (possibly by a run that failed before its first chunk, for instance on
        # a wrong adapter): there is nothing to protect, so the run starts afresh.
        write_json(progress_path(target), {**expected, "complete": False})
        target.touch()
        return 0, None
    check_same_run(target, recorded, expected, keys)
    return repair_output(target)


def _is_empty(path: Path) -> bool:
    return not path.exists() or path.stat().st_size == 0


def repair_output(target: Path) -> tuple[int, int | None]:
    """Cut off a partly written last line and return ``(complete lines, input line of the last one)``.

    A process killed in the middle of a write leaves a line without its newline; every line before it
    was written whole, because lines are only appended.
    """
    if not target.exists():
        return 0, None
    count, end, last = 0, 0, b""
    with open(target, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            count, end, last = count + 1, end + len(raw), raw
    if target.stat().st_size > end:
        with open(target, "rb+") as handle:
            handle.truncate(end)
            os.fsync(handle.fileno())
    return count, _input_line_of(target, count, last) if count else None


def _input_line_of(target: Path, number: int, raw: bytes) -> int:
    try:
        line = json.loads(raw).get("line")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        line = None
    if not isinstance(line, int):
        raise ValueError(
            f"{target}, line {number}: not a prediction line (no integer 'line' field); pass overwrite=True "
            "(--restart) to start over"
        )
    return line


def skip_done_rows(rows: Iterator[Row], done: int, last_line: int | None, target: Path) -> None:
    """Consume the ``done`` rows already predicted, checking that the last one is the output's last line."""
    if not done:
        return
    deque(islice(rows, done - 1), maxlen=0)
    row = next(rows, None)
    if row is None:
        raise ValueError(f"{target}: has {done} lines, more than the input has rows; pass overwrite=True (--restart)")
    if row.line != last_line:
        raise ValueError(
            f"{target}, line {done}: a prediction for input line {last_line}, but input row {done} is on line "
            f"{row.line}: the output was not made from this input; pass overwrite=True (--restart)"
        )


def remove_outputs(output: Path) -> None:
    """Delete an output, its parts and their progress files (``overwrite``, in a single process only)."""
    parts = output.parent.glob(f"{output.name}.part-*")
    for path in (output, progress_path(output), *parts):
        path.unlink(missing_ok=True)


def check_no_other_layout(output: Path, shard: Shard) -> None:
    """Refuse to mix a sharded and an unsharded run on one output: neither could use the other's files."""
    recorded = read_progress(output)
    if shard.sharded:
        if recorded is None and output.exists():
            raise ValueError(f"{output}: exists and was not written by a resumable prediction run; remove it first")
        if recorded is not None and not recorded.get("complete") and recorded.get("world_size") == 1:
            raise ValueError(f"{output}: was started with WORLD_SIZE=1; rerun it that way, or remove it first")
    else:
        parts = sorted(output.parent.glob(f"{output.name}.part-*{PROGRESS_SUFFIX}"))
        unfinished = recorded is not None and not recorded.get("complete") and recorded.get("world_size", 1) > 1
        if parts or unfinished:
            raise ValueError(
                f"{output}: was started with WORLD_SIZE > 1 (parts {output.name}.part-*); rerun it that way, "
                "or pass overwrite=True (--restart)"
            )


# --------------------------------------------------------------------------------------------------
# Predicting
# --------------------------------------------------------------------------------------------------


def predict_chunk(
    model: Any, tokenizer: Any, task: dict[str, Any], rows: list[Row], batch_size: int
) -> tuple[str, int]:
    """The output lines of a chunk, in input order, and how many of its texts were truncated.

    ``predict_probabilities`` sorts the chunk by token length, so batches hold similar lengths.
    """
    texts = [row.text for row in rows]
    encoded = Encoded(tokenizer, texts, None, task["max_length"])
    probabilities, _ = predict_probabilities(model, encoded, batch_size)
    names = task["label_names"]
    lines = [prediction_line(row, values, names) for row, values in zip(rows, probabilities.tolist(), strict=True)]
    return "".join(lines), count_truncated(tokenizer, texts, encoded.ids, task["max_length"])


def prediction_line(row: Row, probabilities: list[float], label_names: list[str]) -> str:
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    record = {
        "line": row.line,
        **row.fields,
        "label": label_names[best],
        "probabilities": dict(zip(label_names, probabilities, strict=True)),
    }
    return json.dumps(record) + "\n"


def count_truncated(tokenizer: Any, texts: list[str], ids: list[list[int]], max_length: int) -> int:
    """Texts longer than ``max_length`` tokens.

    Only texts that filled ``max_length`` are tokenized again, with room for one more token: they
    need more than ``max_length`` exactly when they fill it (a full re-tokenization of every text
    would double the tokenizer's work, and warn about texts longer than the model).
    """
    full = [texts[i] for i, row in enumerate(ids) if len(row) >= max_length]
    if not full:
        return 0
    longer = tokenizer(full, truncation=True, max_length=max_length + 1)["input_ids"]
    return sum(len(row) > max_length for row in longer)


def append_and_sync(handle: Any, text: str) -> None:
    """Append a chunk's lines and force them to disk: after a crash, what is on disk is a prefix of
    the output that a resumed run can trust."""
    handle.write(text.encode("utf-8"))
    handle.flush()
    os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------------
# Merging parts
# --------------------------------------------------------------------------------------------------


@contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the directory, released when the process exits, even by SIGKILL."""
    import fcntl

    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def merge_if_last(output: Path, shard: Shard, identity: dict[str, Any], total: int) -> bool:
    """Merge the parts into ``output`` if every part is complete (and nobody merged them yet).

    Every process calls this after marking its part complete, under a lock, so the last one to finish
    always sees every part complete and merges. The output's progress file says ``complete`` only
    after the merged file is in place, so a crash mid-merge is redone by a rerun.
    """
    parts = [part_path(output, rank) for rank in range(shard.world_size)]
    with directory_lock(output.parent.resolve()):
        recorded = read_progress(output)
        if recorded is not None and recorded.get("complete"):
            return False
        for rank, part in enumerate(parts):
            progress = read_progress(part)
            if progress is None or not progress.get("complete"):
                return False
            check_same_run(part, progress, {**identity, **shard.settings(), "rank": rank}, IDENTITY_KEYS + SHARD_KEYS)
        document = {**identity, "world_size": shard.world_size, "chunk_size": shard.chunk_size, "rows": total}
        write_json(progress_path(output), {**document, "complete": False})
        atomic_write(output, lambda temporary: interleave_parts(parts, Path(temporary), shard.chunk_size, total))
        write_json(progress_path(output), {**document, "complete": True})
        for part in parts:
            part.unlink()
            progress_path(part).unlink()
    return True


def interleave_parts(parts: list[Path], destination: Path, chunk_size: int, total: int) -> None:
    """Chunk 0 of part 0, chunk 0 of part 1, ..., chunk 1 of part 0, ...: the input order again."""
    handles = [open(part, "rb") for part in parts]  # noqa: SIM115 (closed below, all together)
    try:
        written = 0
        with open(destination, "wb") as out:
            for chunk in range(-(-total // chunk_size)):
                lines = list(islice(handles[chunk % len(handles)], chunk_size))
                out.writelines(lines)
                written += len(lines)
        leftover = any(handle.read(1) for handle in handles)
    finally:
        for handle in handles:
            handle.close()
    if written != total or leftover:
        raise ValueError(f"{destination}: the parts {parts[0].name}... do not add up to the input's {total} rows")


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def predict_file(
    adapter_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    text_column: str = "text",
    batch_size: int = 32,
    chunk_size: int = 1024,
    show_progress: bool = True,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Predict every row of ``input_path`` into ``output_path`` (JSON lines), resuming an interrupted run.

    ``rank`` and ``world_size`` default to the ``RANK`` and ``WORLD_SIZE`` environment variables
    (1 process when unset). Returns a summary: the rows of this process, those written now, those
    skipped as already done, truncated texts, seconds (the whole call) and rows per second (the
    prediction loop), and whether this process merged the parts.
    """
    start = time.perf_counter()
    adapter_dir, input_path, output_path = Path(adapter_dir), Path(input_path), Path(output_path)
    _check_arguments(input_path, output_path, batch_size, chunk_size)
    shard = Shard.from_environment(rank, world_size, chunk_size)
    if overwrite:
        if shard.sharded:
            raise ValueError(
                f"overwrite=True (--restart) needs WORLD_SIZE=1; to start over with several processes, remove "
                f"{output_path} and {output_path.name}.part-* first"
            )
        remove_outputs(output_path)
    check_no_other_layout(output_path, shard)
    read_task(adapter_dir)  # a wrong adapter directory fails here, before any file is written
    total = count_rows(input_path, text_column)
    identity = run_identity(adapter_dir, input_path, text_column)
    summary = {"output": str(output_path), "rank": shard.rank, "world_size": shard.world_size, "merged": False}
    finished = read_progress(output_path)
    if shard.sharded and finished is not None and finished.get("complete"):
        check_same_run(output_path, finished, identity, IDENTITY_KEYS)
        rows = shard.own_count(total)
        return {**summary, **_counts(rows, 0, rows, 0, start, 0.0)}

    target = shard.target(output_path)
    keys = IDENTITY_KEYS + SHARD_KEYS if shard.sharded else IDENTITY_KEYS
    done, last_line = prepare_output(target, {**identity, **shard.settings(), "rows": total}, keys)
    rows = shard.own_count(total)
    written, truncated, seconds = _predict_remaining(
        adapter_dir, input_path, target, shard, done, last_line, rows, text_column, batch_size, show_progress
    )
    write_json(progress_path(target), {**read_progress(target), "complete": True})
    if shard.sharded:
        summary["merged"] = merge_if_last(output_path, shard, identity, total)
    return {**summary, **_counts(rows, written, done, truncated, start, seconds)}


def _predict_remaining(
    adapter_dir: Path,
    input_path: Path,
    target: Path,
    shard: Shard,
    done: int,
    last_line: int | None,
    rows: int,
    text_column: str,
    batch_size: int,
    show_progress: bool,
) -> tuple[int, int, float]:
    """Predict this process's rows after the ``done`` ones into ``target``: ``(written, truncated, seconds)``."""
    if done > rows:
        raise ValueError(f"{target}: has {done} lines, more than the {rows} rows to predict; pass overwrite=True")
    own_rows = shard.own_rows(iter_rows(input_path, text_column))
    skip_done_rows(own_rows, done, last_line, target)
    if done == rows:
        return 0, 0, 0.0
    model, tokenizer, task = load_classifier(adapter_dir)
    written = truncated = 0
    start = time.perf_counter()
    bar = progress_bar(total=rows, initial=done, unit="row", desc=f"predict {target.name}", enabled=show_progress)
    with open(target, "ab") as handle, bar:
        for chunk in chunked(own_rows, shard.chunk_size, done):
            lines, cut = predict_chunk(model, tokenizer, task, chunk, batch_size)
            append_and_sync(handle, lines)
            written, truncated = written + len(chunk), truncated + cut
            bar.update(len(chunk))
    return written, truncated, time.perf_counter() - start


def _check_arguments(input_path: Path, output_path: Path, batch_size: int, chunk_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        check_int(flag(name), value, low=1)
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"{output_path}: the output would overwrite the input; choose another --out")
    if not output_path.parent.is_dir():
        raise ValueError(f"{output_path}: the directory {output_path.parent} does not exist")


def _counts(rows: int, written: int, skipped: int, truncated: int, start: float, seconds: float) -> dict[str, Any]:
    return {
        "rows": rows,
        "rows_written": written,
        "rows_skipped": skipped,
        "truncated": truncated,
        "seconds": time.perf_counter() - start,
        "rows_per_second": written / seconds if seconds > 0 else 0.0,
    }
