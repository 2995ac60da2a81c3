"""Command-line options built from the settings dataclasses, so the two never drift apart; checks of
output paths; the one-line error a command stops with.

Each field of :class:`~coda_adapters.config.CodaConfig`, ``TrainConfig`` or ``PretrainConfig`` becomes
one option: its name (``batch_size`` -> ``--batch-size``), type, default and help text (the field's
``metadata``, as peft does) come from the dataclass; ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

# `coda serve --quantize`, here because the server (serve.py), the models it serves (serving.py) and the load test
# all check it. int8 is served from `coda export --int8` on ONNX Runtime (PyTorch's dynamic int8 would give each
# adapter its own quantised copy of the shared frozen layers)
SERVE_QUANTIZE_CHOICES = ("none", "bf16")


class CommandError(Exception):
    """A problem with the user's input: printed as one line, without a traceback."""


def flag(name: str) -> str:
    """The command-line spelling of a settings field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One option per field of the dataclass ``cls``; ``defaults`` replaces some fields' defaults."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = defaults.get(f.name, _default_of(f))
        names = [flag(f.name), *f.metadata.get("aliases", ())]
        parser.add_argument(
            *names, dest=f.name, default=default, help=f.metadata.get("help", ""), **_kind(hints[f.name])
        )
        if "choices" in f.metadata:
            parser._actions[-1].choices = f.metadata["choices"]


def add_subcommand(subparsers: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows every option's default."""
    return subparsers.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of the dataclass ``cls`` from the options of the same names (the rest keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"the settings field {f.name!r} needs a default to become an option")


def _kind(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: bools become ``--x/--no-x``, lists take one or more values."""
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (list, tuple):
        return {"nargs": "+", "type": typing.get_args(annotation)[0]}
    return {"type": annotation}


def output_directory(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` (and its parents) or stop with a one-line error naming the option."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"{option} {path}: cannot create this directory ({error.strerror or error})") from None
    return path


def output_file(path: str | Path, option: str) -> Path:
    """Check that the file ``path`` can be written (its directory is created), or stop naming the option."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{option} {path}: is a directory; give a file name")
    output_directory(path.parent, option)
    return path
