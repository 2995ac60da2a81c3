import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaModel,
    MPNetConfig,
    MPNetForSequenceClassification,
    MPNetModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    T5Config,
    T5EncoderModel,
    T5ForSequenceClassification,
)

from coda_adapters.app.assets import resolve_model_path

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)

# (config class, model classes) for every text family; T5's base is its encoder, which CoDA routes
TINY_FAMILIES = {
    "bert": (BertConfig, BertModel, BertForSequenceClassification),
    "roberta": (RobertaConfig, RobertaModel, RobertaForSequenceClassification),
    "mpnet": (MPNetConfig, MPNetModel, MPNetForSequenceClassification),
    "t5": (T5Config, T5EncoderModel, T5ForSequenceClassification),
    "llama": (LlamaConfig, LlamaModel, LlamaForSequenceClassification),
}
# what the families name differently from TINY
FAMILY_SETTINGS = {
    "t5": dict(d_ff=64, d_kv=8, num_decoder_layers=2, pad_token_id=0, decoder_start_token_id=0),
    "llama": dict(num_key_value_heads=2, pad_token_id=0),
}

# every (family, attention implementation) pair the family supports (MPNet has only eager attention)
FAMILY_ATTENTION = [
    ("bert", "eager"),
    ("bert", "sdpa"),
    ("roberta", "eager"),
    ("roberta", "sdpa"),
    ("mpnet", "eager"),
    ("t5", "eager"),
    ("t5", "sdpa"),
    ("llama", "eager"),
    ("llama", "sdpa"),
]


def tiny_model(family: str = "bert", head: bool = False, attn: str = "sdpa", seed: int = 0, **overrides):
    """A small random model of a family, in eval mode (no dropout)."""
    config_class, base_class, head_class = TINY_FAMILIES[family]
    config = config_class(**{**TINY, **FAMILY_SETTINGS.get(family, {}), **overrides}, num_labels=3)
    config._attn_implementation = attn if family != "mpnet" else "eager"
    torch.manual_seed(seed)
    model = (head_class if head else base_class)(config)
    return model.eval()


def random_ids(batch: int, seq: int, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # ids >= 3 keep clear of RoBERTa's padding id (1)
    return torch.randint(3, vocab, (batch, seq), generator=generator)


def randomize_trainable(model, seed: int = 0, std: float = 0.2) -> None:
    """Give routers, adapters and heads random non-zero weights (the up-projection starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return resolve_model_path("minilm")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def minilm(minilm_path):
    return AutoModel.from_pretrained(minilm_path).eval()
