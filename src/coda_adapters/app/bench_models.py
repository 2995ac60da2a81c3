"""The models ``coda bench --model`` times, one per family, and their inputs.

Real pretrained weights where they exist offline (MiniLM, MPNet, SmolLM2, fed real BBC News text);
otherwise a random-weight model of the paper's size with inputs of the right shape (T5 v1.1 base,
ViT-B/16, wav2vec2-base): the speed of a layer does not depend on its weights. A local model directory
works too. Lengths are always counted in the tokens the Transformer layers see: text tokens, image
patches plus [CLS], or audio frames (``audio_frames_to_samples``: 499 frames are 10 s at 16 kHz).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import load_bbc_news

Batch = dict[str, Any]  # keyword arguments of the model: tensors, and flags such as ViT's interpolate_pos_encoding


@dataclass(frozen=True)
class BenchModel:
    """A model to time: ``load(train)`` builds it (with a classification head when training, num_labels 5);
    ``batch(n, batch_size, mixed)`` makes its inputs for ``n`` layer tokens; ``mixed`` (right-padded inputs
    of spread lengths) is available where ``supports_mixed``."""

    name: str
    config: Any
    load: Callable[[bool], nn.Module]
    batch: Callable[[int, int, bool], Batch]
    pretrained: bool
    supports_mixed: bool = True


RANDOM_MODELS = ("t5-base", "vit-base", "wav2vec2-base", "wav2vec2-base-encoder")


def bench_model(name: str) -> BenchModel:
    """The :class:`BenchModel` for a bundled name (see ``pretrained.BUNDLED_MODELS`` and ``RANDOM_MODELS``)
    or a local Hugging Face model directory."""
    builders = {
        "t5-base": _t5_base,
        "vit-base": _vit_base,
        "wav2vec2-base": _wav2vec2_base,
        "wav2vec2-base-encoder": _wav2vec2_base_encoder,
    }
    if name in builders:
        return builders[name]()
    return _pretrained_text_model(name)


def mixed_lengths(seq_len: int, batch_size: int) -> list[int]:
    """Lengths spread evenly from ``seq_len / 4`` to ``seq_len``."""
    return [round(seq_len / 4 + (seq_len - seq_len / 4) * i / max(1, batch_size - 1)) for i in range(batch_size)]


def _lengths(seq_len: int, batch_size: int, mixed: bool) -> list[int]:
    return mixed_lengths(seq_len, batch_size) if mixed else [seq_len] * batch_size


def text_batch(tokenizer: Any, seq_len: int, batch_size: int, mixed: bool) -> Batch:
    """Real BBC News text, ``[batch, seq_len]``: every example cut to ``seq_len`` tokens or, with
    ``mixed``, to lengths spread evenly from ``seq_len / 4`` to ``seq_len`` and right-padded."""
    texts, _, _ = load_bbc_news()
    joined = " ".join(texts[: 4 * batch_size * max(1, seq_len // 256)])
    words = joined.split()
    chunk = len(words) // batch_size
    examples = [" ".join(words[i * chunk : (i + 1) * chunk]) for i in range(batch_size)]
    pairs = list(zip(examples, _lengths(seq_len, batch_size, mixed), strict=True))
    rows = [tokenizer(text, truncation=True, max_length=length)["input_ids"] for text, length in pairs]
    if any(len(row) < length for row, (_, length) in zip(rows, pairs, strict=True)):
        raise RuntimeError(f"not enough benchmark text for {batch_size} examples of {seq_len} tokens")
    return tokenizer.pad({"input_ids": rows}, padding="max_length", max_length=seq_len, return_tensors="pt")


def random_token_batch(vocab_size: int, seq_len: int, batch_size: int, mixed: bool) -> Batch:
    """Random token ids ``[batch, seq_len]`` (for random-weight models), right-padded to the same lengths as
    :func:`text_batch`."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab_size, (batch_size, seq_len), generator=generator)
    lengths = torch.tensor(_lengths(seq_len, batch_size, mixed))
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def audio_frames_to_samples(frames: int, config: Any) -> int:
    """Samples of 16 kHz audio that wav2vec2's convolutional feature encoder turns into ``frames`` frames."""
    stride = math.prod(config.conv_stride)
    field = 1 + sum((k - 1) * math.prod(config.conv_stride[:i]) for i, k in enumerate(config.conv_kernel))
    return field + (frames - 1) * stride


def _pretrained_text_model(name: str) -> BenchModel:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from .assets import resolve_model_path

    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load(train: bool) -> nn.Module:
        if train:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
            if model.config.pad_token_id is None:  # decoder LMs: the head finds each example's last token
                model.config.pad_token_id = tokenizer.pad_token_id
            return model.eval()
        return AutoModel.from_pretrained(path).eval()

    return BenchModel(
        name=name,
        config=AutoConfig.from_pretrained(path),
        load=load,
        batch=lambda n, b, mixed: text_batch(tokenizer, n, b, mixed),
        pretrained=True,
    )


def _t5_base() -> BenchModel:
    """T5 v1.1 base (the paper's language model): the encoder alone for inference, which is what CoDA routes."""
    from transformers import T5Config, T5EncoderModel, T5ForSequenceClassification

    config = T5Config(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=12,
        num_heads=12,
        feed_forward_proj="gated-gelu",
        num_labels=5,
    )

    def load(train: bool) -> nn.Module:
        torch.manual_seed(0)
        return (T5ForSequenceClassification(config) if train else T5EncoderModel(config)).eval()

    def batch(n: int, b: int, mixed: bool) -> Batch:
        inputs = random_token_batch(config.vocab_size, n, b, mixed)
        for row, length in enumerate(inputs["attention_mask"].sum(-1).tolist()):
            inputs["input_ids"][row, length - 1] = config.eos_token_id  # the classification head reads </s>
        return inputs

    return BenchModel("t5-base", config, load, batch, pretrained=False)


def _vit_base() -> BenchModel:
    """ViT-B/16; ``n`` tokens are ``n - 1`` patches of 16 x 16 pixels (197 tokens: 224 x 224 images)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    def config_for(n: int) -> ViTConfig:
        side = math.isqrt(n - 1)
        if n < 2 or side * side != n - 1:
            raise ValueError(
                f"--seq-lens for vit-base counts [CLS] plus a square grid of patches (e.g. 197 = 1 + 14 x 14 for "
                f"224 x 224 images), got {n}"
            )
        return ViTConfig(image_size=16 * side, patch_size=16, num_labels=5)

    def load(train: bool) -> nn.Module:
        # built for 224 x 224 images; other sizes interpolate the position embeddings
        torch.manual_seed(0)
        config = config_for(197)
        return (ViTForImageClassification(config) if train else ViTModel(config, add_pooling_layer=False)).eval()

    def batch(n: int, b: int, mixed: bool) -> dict[str, Any]:
        side = config_for(n).image_size
        pixels = torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels, "interpolate_pos_encoding": side != 224}

    return BenchModel("vit-base", config_for(197), load, batch, pretrained=False, supports_mixed=False)


def _wav2vec2_base() -> BenchModel:
    """wav2vec2-base (the paper's speech encoder is of this size): random weights, random audio."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification, Wav2Vec2Model

    config = Wav2Vec2Config(num_labels=5)  # the defaults are wav2vec2-base

    def load(train: bool) -> nn.Module:
        torch.manual_seed(0)
        return (Wav2Vec2ForSequenceClassification(config) if train else Wav2Vec2Model(config)).eval()

    def batch(n: int, b: int, mixed: bool) -> Batch:
        samples = audio_frames_to_samples(n, config)
        return {"input_values": torch.randn(b, samples, generator=torch.Generator().manual_seed(0))}

    return BenchModel("wav2vec2-base", config, load, batch, pretrained=False, supports_mixed=False)


def _wav2vec2_base_encoder() -> BenchModel:
    """wav2vec2-base's Transformer encoder alone, on random frames ``[batch, n, 768]``: the part CoDA routes,
    without the convolutional feature encoder that runs densely in front of it (inference only)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    class EncoderOnly(Wav2Vec2Model):
        def forward(self, hidden_states: torch.Tensor) -> Any:
            return self.encoder(hidden_states)

    config = Wav2Vec2Config(num_labels=5)

    def load(train: bool) -> nn.Module:
        if train:
            raise ValueError("wav2vec2-base-encoder times inference only; use --model wav2vec2-base with --train")
        torch.manual_seed(0)
        return EncoderOnly(config).eval()

    def batch(n: int, b: int, mixed: bool) -> Batch:
        return {"hidden_states": torch.randn(b, n, config.hidden_size, generator=torch.Generator().manual_seed(0))}

    return BenchModel("wav2vec2-base-encoder", config, load, batch, pretrained=False, supports_mixed=False)
