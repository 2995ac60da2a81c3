"""Safe file I/O: atomic writes, and reads that fail with the file's name. Only JSON and safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Write through a temporary file in the same directory, fsync it, then rename it over ``path``:
    a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(temporary))
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path: str | os.PathLike, document: Any) -> None:
    text = json.dumps(document, indent=2) + "\n"
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata={"format": "pt"}))


def read_json_object(path: str | os.PathLike, required: Iterable[str] = (), missing_hint: str = "") -> dict[str, Any]:
    """A JSON object with the ``required`` fields, or a ``ValueError`` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file{f' ({missing_hint})' if missing_hint else ''}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(document).__name__}")
    for key in required:
        if key not in document:
            raise ValueError(f"{path}: missing field {key!r}")
    return document


def read_tensors(path: str | os.PathLike, missing_hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a ``ValueError`` naming the file (missing, truncated, corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing{f' ({missing_hint})' if missing_hint else ''}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({error})") from None
