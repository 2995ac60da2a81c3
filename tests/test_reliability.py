"""Reliability of the library's files: no pickle anywhere, hostile or corrupt weights files rejected with the
base model left intact. (The application's training guards and data loader fuzzing are in
app/test_app_reliability.py.)"""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coda_adapters import CodaModel

from helpers import base_weights, saved_adapter, tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "coda_adapters"


def test_the_package_never_unpickles():
    """Only safetensors and JSON are read: no torch.load, pickle, or numpy's allow_pickle anywhere."""
    unsafe = re.compile(
        r"torch\.load\(|import pickle|from pickle|pickle\.loads?\(|allow_pickle\s*=\s*True|dill|joblib\.load"
    )
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if unsafe.search(line)
    ]
    assert not offenders, offenders


def test_weights_of_the_wrong_dtype_are_rejected_and_the_base_restored(tmp_path):
    saved_adapter(tmp_path)
    path = tmp_path / "coda_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("router.weight"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, path)
    base = tiny_model("bert", head=True)
    before = base_weights(base)
    with pytest.raises(ValueError, match=f"{name} has dtype torch.int32"):
        CodaModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())


def test_weights_holding_nan_are_rejected(tmp_path):
    saved_adapter(tmp_path)
    path = tmp_path / "coda_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("adapter.up.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(ValueError, match="holds NaN or inf"):
        CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)


def test_random_bytes_as_weights_file(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "coda_model.safetensors").write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    )
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        CodaModel.from_pretrained(tiny_model("bert", head=True), tmp_path)
