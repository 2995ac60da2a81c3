"""The adapter's file format and its checks.

An adapter directory holds ``coda_config.json`` (format version, library version, the base model's
signature, the :class:`~coda_adapters.config.CodaConfig`) and ``coda_model.safetensors`` (the
trainable weights only, keyed by their names in the wrapped model). Everything read is checked
before a model is touched: a missing, corrupt or foreign file is a ``ValueError`` naming the file
and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CodaConfig
from .files import read_json_object, read_tensors, write_json, write_tensors
from .version import __version__

CONFIG_NAME = "coda_config.json"
WEIGHTS_NAME = "coda_model.safetensors"
FORMAT_VERSION = 1


def write_adapter(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: CodaConfig, base_model: nn.Module
) -> None:
    """Write the adapter's two files (each atomically) into ``directory``, creating it if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / WEIGHTS_NAME, tensors)
    document = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_model": base_model_signature(base_model),
        "coda_config": config.to_dict(),
    }
    write_json(directory / CONFIG_NAME, document)


def read_coda_config(directory: str | os.PathLike, base_model: nn.Module | None = None) -> CodaConfig:
    """Read and check ``coda_config.json``; if ``base_model`` is given, check the adapter was made for it."""
    path = Path(directory) / CONFIG_NAME
    document = read_json_object(
        path,
        ("format_version", "base_model", "coda_config"),
        missing_hint=f"no CoDA adapter here: save_pretrained writes {CONFIG_NAME}",
    )
    if document["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {document['format_version']!r} is not supported (this library reads "
            f"{FORMAT_VERSION})"
        )
    try:
        config = CodaConfig.from_dict(document["coda_config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: invalid coda_config: {error}") from None
    if base_model is not None:
        _check_base_model(path, document["base_model"], base_model_signature(base_model))
    return config


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``coda_model.safetensors``, or a ``ValueError`` naming the file."""
    return read_tensors(path, missing_hint=f"the adapter weights file; save_pretrained writes {WEIGHTS_NAME}")


def check_adapter_weights(
    tensors: dict[str, torch.Tensor], parameters: dict[str, nn.Parameter], source: str | os.PathLike = ""
) -> None:
    """Raise a ``ValueError`` unless ``tensors`` fit ``parameters`` exactly: the same names and shapes,
    floating-point values, none NaN or inf."""
    where = f"{source}: " if source else ""
    missing = sorted(set(parameters) - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    if missing or unexpected:
        raise ValueError(
            f"{where}the adapter weights do not fit this model: missing {_first_few(missing)}, "
            f"unexpected {_first_few(unexpected)}"
        )
    for name, tensor in tensors.items():
        param = parameters[name]
        if tensor.shape != param.shape:
            raise ValueError(f"{where}{name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{where}{name} has dtype {tensor.dtype}, expected a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}{name} holds NaN or inf values")


def base_model_signature(model: nn.Module) -> dict[str, Any]:
    """What an adapter records of the model it was made for; the first three fields must match on load."""
    config = model.config
    return {
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "name_or_path": getattr(config, "_name_or_path", ""),
    }


def _check_base_model(path: Path, saved: dict[str, Any], actual: dict[str, Any]) -> None:
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if saved.get(key) != actual[key]:
            raise ValueError(
                f"{path}: this adapter was made for a base model with {key}={saved.get(key)!r}, but the given "
                f"model has {key}={actual[key]!r}"
            )


def _first_few(names: list[str], count: int = 5) -> str:
    return str(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")
