"""The results table: every baseline and CoDA variant trained with one recipe, then timed side by side.

``coda experiment --preset results`` reproduces the README's table (``make results``);
``--preset demo`` is the short version that ``make demo`` runs. Each row's outputs go to
``OUT/<row>/`` (``OUT/<row>/seed-<s>/`` when several seeds are run; see :func:`row_directory`); a row whose
``metrics.json`` exists is not trained again, so an interrupted run picks up where it stopped.

A preset with ``baselines`` also gets the compute-matched baselines of every CoDA reduction r in it:
the dense adapter trained and tested on the first ``ceil(max_length / r)`` tokens only (the same
token budget per layer, spent on a prefix instead of routed tokens), and a random router at r.
With several seeds every row is trained once per seed; the table gives mean ± sample std over the
seeds and paired differences (same seed) against the dense row and the truncation row at the same budget.
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import CodaConfig
from ..files import read_json_object, write_json
from .classify import (
    METRICS_NAME,
    TrainConfig,
    build_classifier,
    check_router_start,
    load_backbone_adapter,
    load_classifier,
    train_classifier,
)
from .data import ClassificationData, subsample
from .pretrain import PRETRAIN_METRICS_NAME, PretrainConfig, build_pretraining_model, pretrain


@dataclass
class Row:
    """One line of the table: a CoDA configuration, with or without CoDA pretraining first."""

    name: str
    coda: dict[str, Any]
    # CoDA pretraining first: True for the preset's PretrainConfig, or the settings that differ for this row
    pretrain: bool | dict[str, Any] = False
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig settings that differ for this row
    truncation: bool = False  # a compute-matched baseline: the dense adapter on a prefix of the tokens
    teacher: str | None = None  # the name of the row whose run of the same seed it distils (TrainConfig.teacher)
    speed_of: float | None = None  # a truncation row whose input runs as fast as CoDA at this reduction

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Preset:
    rows: list[Row]
    train: TrainConfig
    pretrain: PretrainConfig
    max_train_examples: int | None = None
    speed_batch: int = 8
    speed_repeats: int = 10
    base: dict[str, Any] = field(default_factory=dict)  # CodaConfig settings shared by all rows
    baselines: bool = False  # add truncation and random-router rows for every CoDA reduction (baseline_rows)
    data: str = "bbc-news"  # a built-in dataset (data.BUILTIN_DATASETS)


DENSE = "Dense parallel adapter (r=1)"

# The recipe of the routing tables: 3 epochs; the first dense, the second lowering the kept share of tokens
# from all to 1/r, the third at r (TrainConfig.dense_start, reduction_warmup; without them the learned
# routers fail on bbc-needle: README "Routing that earns its keep")
ROUTING_RECIPE = dict(epochs=3, min_steps=0, batch_size=16, lr=1e-3, dense_start=1 / 3, reduction_warmup=1 / 3)
NO_WARMUP = {"dense_start": 0.0, "reduction_warmup": 0.0}
# The same over 5 epochs: one dense, one lowering the kept share, three at r (is one epoch at r too short?)
LONG_RECIPE = {**ROUTING_RECIPE, "epochs": 5, "dense_start": 0.2, "reduction_warmup": 0.2}


# The annealed soft top-k (TrainConfig.epsilon_start): epsilon from 1 down to the default 0.1 over the warm-up
ANNEALED, ANNEALED_EPSILON = "epsilon annealed from 1 to 0.1", {"epsilon_start": 1.0}


def truncation_row(max_length: int) -> Row:
    return Row(
        f"Dense adapter, first {max_length} tokens", {"reduction": 1}, train={"max_length": max_length}, truncation=True
    )


def speed_matched_row(max_length: int, reduction: float) -> Row:
    """The dense adapter on the first ``max_length`` tokens, where that input runs as fast as CoDA at ``reduction``
    on the preset's full length: a stronger baseline than truncation to the token budget, which runs faster than
    CoDA (the adapter and router still see every token). The length is measured, not derived: see the presets."""
    name = f"Dense adapter, first {max_length} tokens (as fast as CoDA r={reduction:g})"
    return replace(truncation_row(max_length), name=name, speed_of=reduction)


def prior_preset(
    data: str,
    max_length: int,
    reduction: int = 3,
    speed_matched: int | None = None,
    annealed: bool = False,
    kept_share: float = 0.5,
) -> Preset:
    """The dense adapter, CoDA at ``reduction``, and CoDA at ``reduction`` with ``kept_share`` (rounded up) of
    its token budget kept for the text's first tokens, with the routing recipe and the compute-matched
    baselines; given ``speed_matched``, the dense adapter on that many first tokens (see
    :func:`speed_matched_row`); with ``annealed``, the kept-lead row also with the annealed soft top-k."""
    kept = math.ceil(math.ceil(max_length / reduction) * kept_share)
    prior = Row(f"CoDA r={reduction}, first {kept} tokens kept", {"reduction": reduction, "keep_first": kept})
    rows = [Row(DENSE, {"reduction": 1}), Row(f"CoDA r={reduction}", {"reduction": reduction}), prior]
    if annealed:
        rows.append(replace(prior, name=f"{prior.name}, {ANNEALED}", train=ANNEALED_EPSILON))
    if speed_matched is not None:
        rows.append(speed_matched_row(speed_matched, reduction))
    return Preset(
        rows=rows,
        train=TrainConfig(**ROUTING_RECIPE, max_length=max_length),
        pretrain=PretrainConfig(steps=1, max_length=max_length),  # unused
        baselines=True,
        data=data,
    )


def change_preset(
    change: str,
    coda: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    data: str = "bbc-needle",
    max_length: int = 128,
    reductions: tuple[int, ...] = (3, 5),
    speed_matched: dict[int, int] | None = None,
) -> Preset:
    """The routing recipe on ``data``: the dense adapter, and CoDA at each of ``reductions`` both as it is and
    with one change (``coda``: CodaConfig settings, ``train``: TrainConfig settings, named ``change`` in the
    row), with the compute-matched baselines; and, for each ``{reduction: tokens}`` of ``speed_matched``, the
    dense adapter on that many first tokens (:func:`speed_matched_row`). The rows without the change have the
    needle and routing presets' names, so presets of this kind sharing an output directory train them once."""
    rows = [Row(DENSE, {"reduction": 1})]
    for r in reductions:
        rows.append(Row(f"CoDA r={r}", {"reduction": r}))
        rows.append(Row(f"CoDA r={r}, {change}", {"reduction": r, **(coda or {})}, train=train or {}))
    rows += [speed_matched_row(tokens, r) for r, tokens in (speed_matched or {}).items()]
    return Preset(
        rows=rows,
        train=TrainConfig(**ROUTING_RECIPE, max_length=max_length),
        pretrain=PretrainConfig(steps=1, max_length=max_length),  # unused
        baselines=True,
        data=data,
    )


def with_rows(preset: Preset, *rows: Row) -> Preset:
    """``preset`` with ``rows`` added after its own (before the baselines that ``baselines`` adds)."""
    return replace(preset, rows=[*preset.rows, *rows])


ATTENTION_INIT = {"router_init": "attention"}
ROUTER_LR_10 = {"router_lr_scale": 10.0}
ROUTER_LR_30 = {"router_lr_scale": 30.0}
# CoDA pretraining of the routers on bbc-needle: each routed layer learns to reproduce its frozen layer's dense
# output on the same input (needle-pretrain)
NEEDLE_PRETRAINING = PretrainConfig(
    objective="layerwise", steps=100, batch_size=16, lr=1e-3, max_length=128, routers_only=True, reduction_warmup=0.5
)  # `coda pretrain`'s defaults but for max_length, spelled out so that a change of defaults leaves this recipe
TEXT_ATTENTION_INIT = {"router_init": "attention-text"}


def pretrained_fast_router_row(reduction: int, keep_first: int = 0) -> Row:
    """CoDA at ``reduction`` (``keep_first`` tokens kept for the text's first ones) with the preset's CoDA
    pretraining of the routers, then fine-tuned with the routers at 30x the learning rate: the recipe the README
    recommends at r >= 5 where the evidence can be anywhere ("Why pretrained routers cost r = 3"; on BBC News
    topics it does not help: "The same recipe on BBC News at r = 5")."""
    kept = f", first {keep_first} tokens kept" if keep_first else ""
    return Row(
        f"CoDA r={reduction}{kept} + layer-wise pretraining (routers), routers at 30x the learning rate",
        {"reduction": reduction, **({"keep_first": keep_first} if keep_first else {})},
        pretrain=True,
        train=ROUTER_LR_30,
    )


# BBC News at 256 tokens and r = 5, with the input cut to the 68 tokens that run as fast (measured for prior-r5)
BBC_R5: dict[str, Any] = {"data": "bbc-news", "max_length": 256, "reductions": (5,), "speed_matched": {5: 68}}

PRESETS = {
    # BBC News at 256 tokens, r = 3, 5 and 16, each against truncation to its budget and a random router
    # (`coda experiment --preset routing --seeds 0 1 2`, about 3.5 hours on 2 cores)
    "routing": Preset(
        rows=[Row(DENSE, {"reduction": 1})]
        + [Row(f"CoDA r={r}", {"reduction": r}) for r in (3, 5, 16)]
        + [Row("CoDA r=3, distilled from the dense adapter", {"reduction": 3}, teacher=DENSE)],
        train=TrainConfig(**ROUTING_RECIPE, max_length=256),
        pretrain=PretrainConfig(steps=1, max_length=256),  # unused
        baselines=True,
    ),
    # The routing preset at r = 3 and 5 with a longer recipe: 5 epochs, the first dense, the second lowering the
    # kept share to 1/r, three at r (is one epoch at r too short for adapters trained in the dense model?)
    # (`coda experiment --preset routing-long`, about 2.5 hours per seed on 2 cores with the pooling and
    # position rows, split with --rows)
    "routing-long": Preset(
        rows=[Row(DENSE, {"reduction": 1})]
        + [Row(f"CoDA r={r}", {"reduction": r}) for r in (3, 5)]
        + [Row("CoDA r=3, distilled from the dense adapter", {"reduction": 3}, teacher=DENSE)]
        # the head reads only the tokens the last frozen layer processed, as truncation's head does
        + [Row(f"CoDA r={r}, routed-mean pooling", {"reduction": r, "pooling": "routed_mean"}) for r in (3, 5)]
        # routers that can learn "the lead matters" (CodaConfig.router_position_bins)
        + [Row(f"CoDA r={r}, position-aware router", {"reduction": r, "router_position_bins": 8}) for r in (3, 5)],
        train=TrainConfig(**LONG_RECIPE, max_length=256),
        pretrain=PretrainConfig(steps=1, max_length=256),  # unused
        baselines=True,
    ),
    # bbc-needle at 128 tokens: the evidence is a few tokens at a random place (app/needle.py)
    # (`coda experiment --preset needle --seeds 0 1 2`, about an hour on 2 cores)
    "needle": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("CoDA r=3", {"reduction": 3}),
            Row("CoDA r=5", {"reduction": 5}),
            Row("CoDA r=3, no reduction warm-up", {"reduction": 3}, train=NO_WARMUP),
        ],
        train=TrainConfig(**ROUTING_RECIPE, max_length=128),
        pretrain=PretrainConfig(steps=1, max_length=128),  # unused
        baselines=True,
        data="bbc-needle",
    ),
    # Which half of the routing recipe does the work on bbc-needle: the dense start, the warm-up, or both;
    # and a faster router (`coda experiment --preset needle-ablation`, one seed; the rows shared with the
    # needle preset are the same runs, so its seed-0 directories can be copied in)
    "needle-ablation": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("CoDA r=3", {"reduction": 3}),
            Row("CoDA r=3, dense start only", {"reduction": 3}, train={"reduction_warmup": 0.0}),
            Row(
                "CoDA r=3, reduction warm-up only",
                {"reduction": 3},
                train={"dense_start": 0.0, "reduction_warmup": 2 / 3},
            ),
            Row("CoDA r=3, no reduction warm-up", {"reduction": 3}, train=NO_WARMUP),
            Row("CoDA r=3, routers at 10x the learning rate", {"reduction": 3}, train=ROUTER_LR_10),
        ],
        train=TrainConfig(**ROUTING_RECIPE, max_length=128),
        pretrain=PretrainConfig(steps=1, max_length=128),  # unused
        data="bbc-needle",
    ),
    # Routers fitted to the frozen model's attention before training (TrainConfig.router_init), beside plain
    # routers, on bbc-needle at r = 3 and 5 (`coda experiment --preset needle-router-init --seeds 0 1 2`)
    # The speed-matched rows: three runs of `coda bench --seq-lens 36 40 44 48 52 128 --reductions 1 3 5
    # --no-mixed --repeats 40` (batch 8, 2 threads, idle machine) put CoDA r = 3 at 128 tokens level with the
    # dense adapter at 44-54 tokens (108.2 ms against 106.4 ms at 52 in the run with most repeats), r = 5 at
    # 40-50 (77.7 ms against 71.8 / 88.2 ms at 40 / 44): 52 and 42 tokens
    "needle-router-init": change_preset(
        "routers fitted to attention", train=ATTENTION_INIT, speed_matched={3: 52, 5: 42}
    ),
    # The same on BBC News at 256 tokens and r = 5, whose target (within 0.6 points of dense) routing missed
    # (`coda experiment --preset bbc-router-init --seeds 0 1 2`)
    "bbc-router-init": change_preset("routers fitted to attention", train=ATTENTION_INIT, **BBC_R5),
    # The same fit over the text tokens only (--router-init attention-text): over every token the fit is mostly
    # [CLS]/[SEP], the attention sinks (examples/router_init_fit.py); with the --out of needle-router-init and
    # bbc-router-init, the plain rows are reused (`coda experiment --preset needle-router-init-text --seeds 0 1 2`,
    # `--preset bbc-router-init-text`)
    "needle-router-init-text": change_preset(
        "routers fitted to text-token attention", train=TEXT_ATTENTION_INIT, reductions=(5,)
    ),
    "bbc-router-init-text": change_preset(
        "routers fitted to text-token attention", train=TEXT_ATTENTION_INIT, **BBC_R5
    ),
    # A softer soft top-k (epsilon 0.3 against the default 0.1; on the ViT demo with digits anywhere it lifted
    # r = 3 in every seed), beside the default, on bbc-needle at r = 3 and 5 (`coda experiment --preset
    # needle-epsilon --seeds 0 1 2`; with the --out of needle-router-init, the rows they share are reused)
    "needle-epsilon": change_preset("epsilon 0.3", coda={"epsilon": 0.3}),
    # A soft top-k that starts soft and sharpens while the budget shrinks: epsilon from 1 down to the default 0.1
    # over the reduction warm-up (--epsilon-start 1; `coda experiment --preset needle-epsilon-anneal --seeds 0 1 2`)
    "needle-epsilon-anneal": change_preset(ANNEALED, train=ANNEALED_EPSILON),
    # The same from 0.3: from 1, one r = 3 seed of three lost the needle (92.1%); does a gentler start keep the
    # r = 5 gain without that? (`coda experiment --preset needle-epsilon-anneal-gentle --seeds 0 1 2`)
    "needle-epsilon-anneal-gentle": change_preset("epsilon annealed from 0.3 to 0.1", train={"epsilon_start": 0.3}),
    # The same on BBC News at 256 tokens and r = 5 (with the --out of bbc-router-init, the plain rows are reused)
    "bbc-epsilon-anneal": change_preset(ANNEALED, train=ANNEALED_EPSILON, **BBC_R5),
    # Straight-through routers (CodaConfig.straight_through): the selected tokens get the frozen layer's whole
    # update (λ = 1, as in the dense model) and the router the soft top-k's gradient; in the plain r = 5 models of
    # bbc-router-init a fifth of the selected tokens have λ < 0.9. On bbc-needle at r = 3 and 5 (`coda
    # experiment --preset needle-straight-through --seeds 0 1 2`, with the --out of needle-router-init) and on
    # BBC News at r = 5 (`--preset bbc-straight-through`, with the --out of bbc-router-init)
    "needle-straight-through": change_preset("straight-through router", coda={"straight_through": True}),
    "bbc-straight-through": change_preset("straight-through router", coda={"straight_through": True}, **BBC_R5),
    # ST-MoE's router z-loss (TrainConfig.router_z_loss; coda_adapters.routing.router_z_loss) at ST-MoE's weight
    # and at 100 times it, the last untried idea of the routing issue's list, at r = 5 on bbc-needle, where plain
    # routers lose the needle in some seeds and their choice decides (`coda experiment --preset needle-z-loss
    # --seeds 0 1 2 3 4`, about 3 hours of one core)
    "needle-z-loss": with_rows(
        change_preset("router z-loss 0.001", train={"router_z_loss": 1e-3}, reductions=(5,), speed_matched={5: 42}),
        Row("CoDA r=5, router z-loss 0.1", {"reduction": 5}, train={"router_z_loss": 0.1}),
    ),
    # A position prior inside routing: half of r = 3's budget is the text's first tokens (CodaConfig.keep_first),
    # the router picks the other half; on BBC News, where the lead tells the topic and truncation beats
    # routing, and on bbc-needle, where the evidence is anywhere (`coda experiment --preset prior --seeds 0 1 2`
    # and `--preset prior-needle`; about 1.5 hours and 40 minutes per seed on one core; `--preset prior-r5`: the
    # same at r = 5, whose target is within 0.6 points of dense)
    # The speed-matched rows: `coda bench --seq-lens 64 72 96 104 256 --reductions 1 3 5 --no-mixed` (batch 8, 2
    # threads, idle machine) timed CoDA r = 3 at 256 tokens at 98.6 ms, the dense adapter at 96 / 104 tokens at
    # 98.1 / 93.5 ms; CoDA r = 5 at 69.8 ms, the dense adapter at 64 / 72 tokens at 67.4 / 73.4 ms
    "prior": prior_preset("bbc-news", max_length=256, speed_matched=100),
    "prior-r5": prior_preset("bbc-news", max_length=256, reduction=5, speed_matched=68),
    # the same with the kept-lead row also trained with the annealed soft top-k, the best routed change at r = 5
    # on BBC News alone (`coda experiment --preset prior-r5-anneal --seeds 0 1 2`; with `--out runs/bbc-router-init`
    # the dense, plain r = 5 and baseline rows of bbc-router-init are reused)
    "prior-r5-anneal": prior_preset("bbc-news", max_length=256, reduction=5, speed_matched=68, annealed=True),
    # the same with three quarters of the budget (39 of 52 tokens) kept for the lead: between the half-kept row
    # (97.4%) and the 52-token cut (96.9%), is there more to gain from the lead? (`--out runs/bbc-router-init`)
    "prior-r5-lead39": prior_preset(
        "bbc-news", max_length=256, reduction=5, speed_matched=68, annealed=True, kept_share=0.75
    ),
    # the whole budget kept for the lead (52 of 52): the frozen layers run what the 52-token cut runs, the
    # adapters and the head still see all 256 tokens, and the routers choose nothing; the end of the kept-share
    # sweep (26, 39, 52), which says what the routers' picks add on BBC at r = 5 (`--out runs/bbc-router-init`)
    "prior-r5-lead52": prior_preset("bbc-news", max_length=256, reduction=5, speed_matched=68, kept_share=1.0),
    # the best routed row at r = 5 (39 kept), the dense adapter and the compute-matched baselines with the 5-epoch
    # recipe (LONG_RECIPE): on one seed of routing-long it lifted r = 3 by 0.8 and the cuts about as much; over 3
    # seeds, where does r = 5 end against the dense adapter of the same recipe? (`coda experiment --preset
    # prior-r5-lead39-long --seeds 0 1 2 --out runs/bbc-long`, about 3.5 hours of one core: its own --out, since
    # its rows share names with the 3-epoch presets). Plain r = 5 routers and the 68-token cut, as fast as r = 5
    # (measured for prior-r5), came a session later (`--rows coda-r-5
    # dense-adapter-first-68-tokens-as-fast-as-coda-r-5`, about 1.5 hours of one core; training is deterministic
    # per seed, so the other rows' runs stand)
    "prior-r5-lead39-long": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("CoDA r=5", {"reduction": 5}),
            Row("CoDA r=5, first 39 tokens kept", {"reduction": 5, "keep_first": 39}),
            speed_matched_row(68, 5),
        ],
        train=TrainConfig(**LONG_RECIPE, max_length=256),
        pretrain=PretrainConfig(steps=1, max_length=256),  # unused
        baselines=True,  # + the dense adapter on the first 52 tokens, + a random router at r = 5
    ),
    "prior-needle": prior_preset("bbc-needle", max_length=128),
    # the price of a longer lead where the evidence is anywhere: 33 of r = 3's 43 tokens kept on bbc-needle
    # (`coda experiment --preset prior-needle-lead33 --seeds 0 1 2`; with `--out runs/needle-router` the dense,
    # plain and baseline rows of the needle presets are reused)
    "prior-needle-lead33": prior_preset("bbc-needle", max_length=128, kept_share=0.75),
    # Aggressive reductions where the choice of tokens decides: bbc-needle at 128 tokens, r = 8 and 16 (16 and 8
    # tokens per routed layer), plain and with routers fitted to attention, against the input cut to the same
    # budget and random routers; on BBC News these targets cannot be met, since the random router at r = 16 is
    # within 1.3 points of dense (`coda experiment --preset needle-aggressive --seeds 0 1 2`; with the --out of
    # needle-router-init the dense row is reused). The speed-matched rows: four runs of `coda bench --seq-lens 12
    # 16 20 24 128 --reductions 1 8 16 --no-mixed --repeats 40 --threads 2` (batch 8, idle machine) put CoDA r = 8
    # at 128 tokens (40-45 ms) level with the dense adapter at 24 (39-45 ms), r = 16 (30-37 ms) between 16 and 20
    # (30-36 / 35-42 ms): 24 and 18 tokens
    "needle-aggressive": change_preset(
        "routers fitted to attention", train=ATTENTION_INIT, reductions=(8, 16), speed_matched={8: 24, 16: 18}
    ),
    # CoDA pretraining before fine-tuning (method section 4) at r = 3, 5 and 16 on bbc-needle, over seeds: each
    # routed layer learns to reproduce what its frozen layer computes densely on the same input (layer-wise
    # targets, not the final-state distillation that shrank the hidden states: README "CoDA pretraining"), on the
    # training texts, with the reduction warm-up that made the decoder's pretraining work ("SmolLM2 prefill").
    # Routers only: with the adapters too, the layers' inputs drift to where matching is easy (r = 3's row).
    # At r = 16, beside the routers fitted to attention that needle-aggressive found best there
    "needle-pretrain": Preset(
        rows=[Row(DENSE, {"reduction": 1})]
        + [
            row
            for r in (3, 5, 16)
            for row in (
                Row(f"CoDA r={r}", {"reduction": r}),
                Row(f"CoDA r={r} + layer-wise pretraining (routers)", {"reduction": r}, pretrain=True),
            )
        ]
        + [
            Row(
                "CoDA r=3 + layer-wise pretraining (routers and adapters)",
                {"reduction": 3},
                pretrain={"routers_only": False},
            ),
            # the other way to start routers from the frozen model (needle-router-init, needle-aggressive)
            Row("CoDA r=16, routers fitted to attention", {"reduction": 16}, train=ATTENTION_INIT),
        ],
        train=TrainConfig(**ROUTING_RECIPE, max_length=128),
        pretrain=NEEDLE_PRETRAINING,
        baselines=True,
        data="bbc-needle",
    ),
    # Routers barely move in fine-tuning (cosine 0.99 to where they started, plain or pretrained), and pretrained
    # ones start where the frozen states' scores spread widely, which the adapters steer less easily (README "Why
    # pretrained routers cost r = 3"): the same rows with the routers at 10x the learning rate in fine-tuning, with
    # and without pretraining. The rows shared with needle-pretrain are the same runs (copy its directories in)
    "needle-pretrain-router-lr": Preset(
        rows=[Row(DENSE, {"reduction": 1})]
        + [
            Row(f"CoDA r={r}{pretrained}{faster}", {"reduction": r}, pretrain=bool(pretrained), train=train)
            for r in (3, 5, 16)
            for pretrained in ("", " + layer-wise pretraining (routers)")
            for faster, train in (("", {}), (", routers at 10x the learning rate", ROUTER_LR_10))
        ]
        # is 10x the rate? A faster one (r = 3's came a session after r = 5's and 16's)
        + [pretrained_fast_router_row(r) for r in (5, 16, 3)],
        train=TrainConfig(**ROUTING_RECIPE, max_length=128),
        pretrain=NEEDLE_PRETRAINING,
        baselines=True,
        data="bbc-needle",
    ),
    # The recommended recipe on BBC News at 256 tokens and r = 5, whose target (within 0.6 points of dense) routing
    # missed: pretrained routers at 30x the learning rate, plain and with 39 of the 52 budget tokens kept for the
    # lead (the best routed row there, prior-r5-lead39), beside the cut that runs as fast (68 tokens). The rows
    # without pretraining have the names and recipes of prior-r5-lead39's (`coda experiment --preset
    # bbc-pretrain-router-lr --seeds 0 1 2`, about 3.5 hours of one core)
    "bbc-pretrain-router-lr": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("CoDA r=5", {"reduction": 5}),
            Row("CoDA r=5, first 39 tokens kept", {"reduction": 5, "keep_first": 39}),
            pretrained_fast_router_row(5),
            pretrained_fast_router_row(5, keep_first=39),
            speed_matched_row(68, 5),
        ],
        train=TrainConfig(**ROUTING_RECIPE, max_length=256),
        pretrain=replace(NEEDLE_PRETRAINING, max_length=256),
        baselines=True,  # + the dense adapter on the first 52 tokens, + a random router at r = 5
    ),
    # bbc-pretrain-router-lr's rows without pretraining (the same runs in a shared --out), so that they can have
    # more seeds than the pretrained rows: `coda experiment --preset bbc-r5-lead39 --seeds 0 1 2 3 4 --out
    # runs/bbc-lr` adds seeds 3 and 4 to that table's (about 45 minutes of one core per seed)
    "bbc-r5-lead39": prior_preset("bbc-news", max_length=256, reduction=5, speed_matched=68, kept_share=0.75),
    # `make demo`: the needle preset's first rows, one seed (15 to 25 minutes on 2 cores)
    "demo": Preset(
        rows=[Row(DENSE, {"reduction": 1}), Row("CoDA r=3", {"reduction": 3})],
        train=TrainConfig(**ROUTING_RECIPE, max_length=128),
        pretrain=PretrainConfig(steps=1, max_length=128),  # unused
        baselines=True,  # + the dense adapter on the first 43 tokens, + a random router at r=3
        data="bbc-needle",
    ),
    # The tables below were made before routing started dense, and keep their recipe (no warm-up).
    "results": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("Series adapter (r=1)", {"reduction": 1, "adapter": "series"}),
            # LoRA at its usual, higher learning rate (the one the offline-assets scout used)
            Row("LoRA (peft, rank 8)", {"reduction": 1, "adapter": "none", "lora_rank": 8}, train={"lr": 2e-3}),
            Row("CoDA r=3", {"reduction": 3}),
            Row("CoDA r=3 + pretraining", {"reduction": 3}, pretrain=True),
            Row("CoDA r=5", {"reduction": 5}),
            Row("CoDA r=5 + pretraining", {"reduction": 5}, pretrain=True),
            Row("CoDA r=3, random router", {"reduction": 3, "router": "random"}),
            Row(
                "CoDA r=3, coordinate-descent soft top-k",
                {"reduction": 3, "soft_topk_method": "coordinate_descent", "epsilon": 0.03},
            ),
        ],
        train=TrainConfig(epochs=3, min_steps=0, batch_size=16, lr=1e-3, max_length=256, **NO_WARMUP),
        # final-state distillation, routers only (distilling with the adapters too shrank the features and cost
        # accuracy: README), at r from the first step: the pretraining of this table, made before the layer-wise one
        pretrain=PretrainConfig(
            objective="distill", steps=200, batch_size=16, lr=1e-3, max_length=256, reduction_warmup=0.0
        ),
        baselines=True,  # + dense adapter on the first 86 and 52 tokens, + random router at r=5
    ),
    # aggressive reductions at 256 tokens, where truncation keeps little more than the headline
    # (`coda experiment --preset aggressive --seeds 0 1 2`, about 80 minutes on 2 cores)
    "aggressive": Preset(
        rows=[Row(DENSE, {"reduction": 1}), Row("CoDA r=8", {"reduction": 8}), Row("CoDA r=16", {"reduction": 16})],
        train=TrainConfig(epochs=3, min_steps=0, batch_size=16, lr=1e-3, max_length=256, **NO_WARMUP),
        pretrain=PretrainConfig(steps=200, batch_size=16, lr=1e-3, max_length=256, routers_only=True),  # unused
        baselines=True,  # + dense adapter on the first 32 and 16 tokens, + random routers at r=8 and r=16
    ),
    # MPNet-base (run with --model mpnet): a subset and one epoch keep it under 10 minutes on 2 cores
    "mpnet": Preset(
        rows=[Row(DENSE, {"reduction": 1}), Row("CoDA r=3", {"reduction": 3})],
        train=TrainConfig(epochs=1, min_steps=0, batch_size=16, lr=1e-3, max_length=128, **NO_WARMUP),
        pretrain=PretrainConfig(steps=1, batch_size=16, lr=1e-3, max_length=128, routers_only=True),  # unused
        max_train_examples=400,
    ),
    # a minute-long check of the whole pipeline (used by the tests)
    "smoke": Preset(
        rows=[
            Row(DENSE, {"reduction": 1}),
            Row("CoDA r=3 + pretraining", {"reduction": 3}, pretrain=True),
            Row("LoRA (peft, rank 8)", {"reduction": 1, "adapter": "none", "lora_rank": 8}, train={"lr": 2e-3}),
        ],
        train=TrainConfig(epochs=1, min_steps=0, batch_size=8, lr=1e-3, max_length=32, val_size=0.2),
        pretrain=PretrainConfig(steps=2, batch_size=4, lr=1e-3, max_length=32, routers_only=True),
        max_train_examples=48,
        speed_repeats=2,
    ),
}


def run_experiment(
    preset: Preset,
    data: ClassificationData,
    out_dir: str | Path,
    model_name: str = "minilm",
    fresh: bool = False,
    seeds: tuple[int, ...] = (0,),
    only: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Train every row once per seed (skipping finished runs unless ``fresh``), then time all rows side by side.

    ``only`` (row slugs, ``coda experiment --rows``) trains those rows and nothing else, so that a preset can be
    split over processes or machines sharing ``out_dir``; the table is written once every row has finished, and
    not while ``out_dir`` holds every row's runs of other seeds too (a process given ``--seeds 2`` must not replace
    the table of seeds 0, 1 and 2 by one of seed 2). Returns the table's rows, or [] when no table was written."""
    out_dir, seeds, rows = Path(out_dir), check_seeds(seeds), experiment_rows(preset)
    trained = rows if only is None else select_rows(rows, only)
    if fresh:  # the runs of these seeds only: another process's seeds in a shared --out stay
        for row in trained:
            for seed in seeds:
                remove_run(row_directory(out_dir, row, seed, seeds))
    if preset.max_train_examples is not None:  # one subsample for every seed: the seeds vary the runs, not the data
        data = replace(data, train=subsample(data.train, preset.max_train_examples, preset.train.seed))
    for seed in seeds:  # seed by seed, so that an interrupted run has every row for the seeds it finished
        for row in trained:
            directory = row_directory(out_dir, row, seed, seeds)
            what = row.name if seeds == (0,) else f"{row.name}, seed {seed}"
            if finished(directory):
                pretraining = row_pretrain_config(preset, row, seed) if row.pretrain else None
                check_kept_run(directory, row_train_config(preset, row, seed), pretraining)
                print(f"== {what}: done before, kept ({directory})")
                continue
            print(f"== {what}")
            teacher = None if row.teacher is None else teacher_directory(row, rows, out_dir, seed, seeds)
            train_row(row, preset, data, directory, model_name, seed, teacher)
    missing = [row.slug for row in rows if not all(finished(row_directory(out_dir, row, s, seeds)) for s in seeds)]
    if missing:
        print(f"== not every row has finished yet ({', '.join(missing)}): no table written; run without --rows")
        return []
    other_seeds = other_finished_seeds(out_dir, rows, seeds)
    if other_seeds:  # a process given part of the seeds must not replace the table of them all
        every = " ".join(str(seed) for seed in sorted({*seeds, *other_seeds}))
        print(
            f"== --out also holds every row's finished runs of seeds {other_seeds}: no table written for seeds "
            f"{list(seeds)} alone; write the table of every seed with --seeds {every}"
        )
        return []
    results = [summarize_row(row, [row_directory(out_dir, row, seed, seeds) for seed in seeds], seeds) for row in rows]
    add_paired_differences(results, rows, preset)
    if preset.data == "bbc-needle":
        add_routed_evidence(results, rows, data, out_dir, seeds)
    timed = {row.name: row_directory(out_dir, row, seeds[0], seeds) for row in rows}
    speedups = measure_inference_speedups(preset, data, timed)
    dense = next(r for r in results if r["name"] == DENSE)
    for result in results:
        result["inference_speedup"] = speedups[result["name"]]
        result["training_speedup"] = dense["epoch_seconds"] / result["epoch_seconds"]
    write_results(results, preset, out_dir, title=f"{data.source}, {model_name}")
    return results


def check_seeds(seeds: Any) -> tuple[int, ...]:
    seeds = tuple(seeds)
    ok = len(seeds) > 0 and len(set(seeds)) == len(seeds)
    if not ok or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"--seeds must be one or more distinct integers >= 0, got {list(seeds)}")
    return seeds


def select_rows(rows: list[Row], slugs: tuple[str, ...]) -> list[Row]:
    """The rows named by ``slugs`` (their directory names under OUT), in the preset's order."""
    known = [row.slug for row in rows]
    unknown = [slug for slug in slugs if slug not in known]
    if unknown or not slugs:
        raise ValueError(f"--rows must name rows of the preset, got {list(slugs)}; its rows are: {', '.join(known)}")
    return [row for row in rows if row.slug in slugs]


def finished(directory: Path) -> bool:
    """Whether the run in ``directory`` ended: ``train_classifier`` writes ``metrics.json`` last."""
    return (directory / METRICS_NAME).is_file()


def row_directory(out_dir: Path, row: Row, seed: int, seeds: tuple[int, ...]) -> Path:
    """``OUT/<row>/seed-<s>/``; a run of seed 0 alone keeps the single-seed layout ``OUT/<row>/``, and such a
    finished run is seed 0 of a run of several seeds too (unless ``seed-0/`` holds one), so that a first look
    with one seed is not trained again, and seeds split over processes (``--seeds 0`` in one) meet; the other way
    round, seed 0 alone reuses a finished ``seed-0/`` when ``OUT/<row>/`` holds no run of its own."""
    single = out_dir / row.slug
    if tuple(seeds) == (0,) and finished(single / "seed-0") and not finished(single):
        return single / "seed-0"
    if tuple(seeds) == (0,) or (seed == 0 and finished(single) and not finished(single / "seed-0")):
        return single
    return single / f"seed-{seed}"


SEED_DIRECTORY = re.compile(r"seed-(\d+)")  # OUT/<row>/seed-<s>/, as row_directory names it


def remove_run(directory: Path) -> None:
    """Delete the run in ``directory``, but not the ``seed-*`` runs that a row's single-seed directory holds."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if SEED_DIRECTORY.fullmatch(path.name):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def other_finished_seeds(out_dir: Path, rows: list[Row], seeds: tuple[int, ...]) -> list[int]:
    """The seeds outside ``seeds`` with a finished run of every row in ``out_dir``: a table of more seeds can be
    written. (Seeds that only some rows have, say from another preset sharing those rows, do not count.)"""
    return sorted(set.intersection(*(finished_seeds(out_dir, row) for row in rows)) - set(seeds))


def finished_seeds(out_dir: Path, row: Row) -> set[int]:
    """The seeds of ``row`` with a finished run under ``out_dir``, in either layout of ``row_directory``."""
    single = out_dir / row.slug
    seeds = {0} if finished(single) else set()
    for directory in single.glob("seed-*"):
        match = SEED_DIRECTORY.fullmatch(directory.name)
        if match and finished(directory):
            seeds.add(int(match.group(1)))
    return seeds


# --------------------------------------------------------------------------------------------------
# Rows: the preset's own and the compute-matched baselines
# --------------------------------------------------------------------------------------------------


def experiment_rows(preset: Preset) -> list[Row]:
    return preset.rows + (baseline_rows(preset) if preset.baselines else [])


def row_coda_config(preset: Preset, row: Row) -> CodaConfig:
    return CodaConfig(**{"pooling": "mean", **preset.base, **row.coda})


def row_max_length(preset: Preset, row: Row) -> int:
    return int({**asdict(preset.train), **row.train}["max_length"])


def token_budget(preset: Preset, row: Row) -> int | None:
    """Tokens each routed layer of a CoDA row runs on, ``ceil(max_length / r)``; None for an unrouted row."""
    reduction = row_coda_config(preset, row).reduction
    if row.truncation or reduction <= 1:
        return None
    return math.ceil(row_max_length(preset, row) / reduction)


def baseline_rows(preset: Preset) -> list[Row]:
    """For every CoDA reduction r in the preset: the dense adapter on the first ``ceil(max_length / r)``
    tokens, and a random router at r unless the preset has one; rows it already has are not repeated."""
    budgets = {budget for row in preset.rows if (budget := token_budget(preset, row)) is not None}
    configs = [row_coda_config(preset, row) for row in preset.rows if token_budget(preset, row) is not None]
    baselines = [truncation_row(budget) for budget in sorted(budgets, reverse=True)]
    random_at = {config.reduction for config in configs if config.router == "random"}
    for reduction in sorted({config.reduction for config in configs} - random_at):
        baselines.append(Row(f"CoDA r={reduction:g}, random router", {"reduction": reduction, "router": "random"}))
    names = {row.name for row in preset.rows}
    return [row for row in baselines if row.name not in names]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def teacher_directory(row: Row, rows: list[Row], out_dir: Path, seed: int, seeds: tuple[int, ...]) -> Path:
    """The finished run, of the same seed, of the row that ``row`` distils."""
    teacher = next((other for other in rows if other.name == row.teacher), None)
    if teacher is None:
        raise ValueError(f"row {row.name!r} distils {row.teacher!r}, which is not a row of the preset")
    directory = row_directory(out_dir, teacher, seed, seeds)
    if not finished(directory):
        raise ValueError(
            f"row {row.name!r} distils {teacher.name!r}, whose run {directory} has not finished: "
            f"train it first (--rows {teacher.slug})"
        )
    return directory


def train_row(
    row: Row,
    preset: Preset,
    data: ClassificationData,
    directory: Path,
    model_name: str,
    seed: int = 0,
    teacher: Path | None = None,
) -> None:
    config = row_coda_config(preset, row)
    train_config = row_train_config(preset, row, seed)
    pretrain_dir = directory / "pretrain"
    torch.manual_seed(seed)
    extra: dict[str, Any] = {"row": row.name, "seed": seed}
    if row.pretrain:
        check_router_start(pretrain_dir, train_config.router_init)
        pretrain_config = row_pretrain_config(preset, row, seed)
        model, tokenizer = build_pretraining_model(model_name, config, pretrain_config.objective)
        metrics = pretrain(model, tokenizer, data.train.texts, pretrain_config, pretrain_dir, model_name=model_name)
        extra["pretrain"] = {k: metrics[k] for k in ("objective", "first_loss", "final_loss", "pretrain_seconds")}
        torch.manual_seed(seed)
    model, tokenizer = build_classifier(model_name, config, data.label_names)
    if row.pretrain:
        load_backbone_adapter(model, pretrain_dir)
    if teacher is not None:
        train_config = replace(train_config, teacher=str(teacher))
    train_classifier(model, tokenizer, data, train_config, directory, model_name=model_name, extra_metrics=extra)


def row_train_config(preset: Preset, row: Row, seed: int) -> TrainConfig:
    """The recipe ``row`` trains with: the preset's, with the row's own settings and ``seed``."""
    return TrainConfig(**{**asdict(preset.train), **row.train, "seed": seed})


def row_pretrain_config(preset: Preset, row: Row, seed: int) -> PretrainConfig:
    """The CoDA pretraining of a ``pretrain`` row: the preset's, with the row's own settings and ``seed``."""
    changes = row.pretrain if isinstance(row.pretrain, dict) else {}
    return PretrainConfig(**{**asdict(preset.pretrain), **changes, "seed": seed})


def check_kept_run(directory: Path, expected: TrainConfig, pretraining: PretrainConfig | None = None) -> None:
    """Refuse a finished run in ``directory`` that was trained with another recipe than ``expected`` (and, for a
    row with CoDA pretraining, pretrained otherwise than ``pretraining``).

    Rows are reused by directory name, and presets of different recipes have rows of the same names (the
    5-epoch ``prior-r5-lead39-long`` and the 3-epoch ``prior-r5-lead39``): without this check a shared ``--out``
    would put another recipe's run in the table. The distillation teacher's path is not compared (it names
    where ``--out`` was when the run was trained). Settings a run does not record (added later) are not compared."""
    differ = recipe_differences(read_json_object(directory / METRICS_NAME).get("train_config", {}), expected)
    if pretraining is not None:
        stored = read_json_object(directory / "pretrain" / PRETRAIN_METRICS_NAME).get("pretrain_config", {})
        differ |= {f"pretraining {key}": values for key, values in recipe_differences(stored, pretraining).items()}
    if differ:
        settings = ", ".join(
            f"{key} {setting(was)} (this preset: {setting(now)})" for key, (was, now) in differ.items()
        )
        raise ValueError(
            f"--out holds a finished run in {directory} trained with another recipe: {settings}. Use another --out "
            "for this preset, or --fresh to train its rows again (which deletes those runs)"
        )


def recipe_differences(stored: dict[str, Any], expected: TrainConfig | PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{setting: (stored, expected)}`` for the settings of ``expected`` that ``stored`` records otherwise."""
    return {
        key: (stored[key], value)
        for key, value in asdict(expected).items()
        if key in stored and key != "teacher" and stored[key] != value
    }


def setting(value: Any) -> str:
    """A recipe setting as an error shows it: floats to 4 significant digits (1/3 as 0.3333), the rest as repr."""
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


# --------------------------------------------------------------------------------------------------
# Summaries over seeds
# --------------------------------------------------------------------------------------------------


def summarize_row(row: Row, directories: list[Path], seeds: tuple[int, ...]) -> dict[str, Any]:
    """One row of results.json: means over the seeds' runs, with the per-seed test metrics and their std."""
    runs = [read_json_object(directory / METRICS_NAME) for directory in directories]
    accuracy = [run["accuracy"] for run in runs]
    macro_f1 = [run["macro_f1"] for run in runs]
    return {
        "name": row.name,
        "truncation": row.truncation,
        "accuracy": statistics.mean(accuracy),
        "accuracy_std": sample_std(accuracy),
        "accuracy_per_seed": accuracy,
        "macro_f1": statistics.mean(macro_f1),
        "macro_f1_std": sample_std(macro_f1),
        "macro_f1_per_seed": macro_f1,
        "seeds": list(seeds),
        "max_length": runs[0]["train_config"]["max_length"],
        "train_seconds": statistics.mean(run["train_seconds"] for run in runs),
        "epoch_seconds": statistics.mean(seconds for run in runs for seconds in run["epoch_seconds"]),
        "pretrain_seconds": mean_or_none([run.get("pretrain", {}).get("pretrain_seconds") for run in runs]),
        "eval_examples_per_second": statistics.mean(run["eval_examples_per_second"] for run in runs),
        "val_accuracy": mean_or_none([run["history"][-1].get("val_accuracy") for run in runs]),
        "coda_config": runs[0]["coda_config"],
    }


def sample_std(values: list[float]) -> float:
    """The sample standard deviation (n - 1); 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_or_none(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else statistics.mean(values)


def add_paired_differences(results: list[dict[str, Any]], rows: list[Row], preset: Preset) -> None:
    """``diff_vs_dense``, ``diff_vs_truncation`` (the truncation row of the same token budget) and
    ``diff_vs_speed_matched`` (the truncation row as fast as the same reduction, :func:`speed_matched_row`),
    each None where the row has no such reference."""
    by_name = {result["name"]: result for result in results}
    dense = by_name.get(DENSE)
    budget_matched = {row_max_length(preset, row): row for row in rows if row.truncation and row.speed_of is None}
    speed_matched = {row.speed_of: row for row in rows if row.speed_of is not None}
    for row in rows:
        result = by_name[row.name]
        result["diff_vs_dense"] = None if dense is None or row.name == DENSE else paired_difference(result, dense)
        budget = token_budget(preset, row)
        references = {
            "diff_vs_truncation": None if budget is None else budget_matched.get(budget),
            "diff_vs_speed_matched": None
            if budget is None
            else speed_matched.get(row_coda_config(preset, row).reduction),
        }
        for key, reference in references.items():
            result[key] = None if reference is None else paired_difference(result, by_name[reference.name])


def paired_difference(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per seed, ``result - reference`` of the same seed's runs, and the mean and sample std of those differences."""
    difference: dict[str, Any] = {"against": reference["name"], "seeds": result["seeds"]}
    for metric in ("accuracy", "macro_f1"):
        pairs = zip(result[f"{metric}_per_seed"], reference[f"{metric}_per_seed"], strict=True)
        per_seed = [value - other for value, other in pairs]
        difference.update({f"{metric}_per_seed": per_seed, metric: statistics.mean(per_seed)})
        difference[f"{metric}_std"] = sample_std(per_seed)
    return difference


def add_routed_evidence(
    results: list[dict[str, Any]], rows: list[Row], data: ClassificationData, out_dir: Path, seeds: tuple[int, ...]
) -> None:
    """``routed_needle`` of every routed row on bbc-needle: per layer, the share of test texts whose needle
    colour, "access" and distractor colours its frozen layer ran on (:func:`needle.routed_evidence`), mean
    over the seeds."""
    from .needle import routed_evidence

    for row, result in zip(rows, results, strict=True):
        if result["coda_config"]["reduction"] <= 1:
            continue
        per_seed = []
        for seed in seeds:
            model, tokenizer, task = load_classifier(row_directory(out_dir, row, seed, seeds))
            per_seed.append(routed_evidence(model, tokenizer, data.test.texts, task["max_length"]))
        result["routed_needle"] = {
            str(layer): {name: statistics.mean(run[layer][name] for run in per_seed) for name in shares}
            for layer, shares in per_seed[0].items()
        }


# --------------------------------------------------------------------------------------------------
# Inference speed
# --------------------------------------------------------------------------------------------------


def measure_inference_speedups(
    preset: Preset, data: ClassificationData, directories: dict[str, Path]
) -> dict[str, float]:
    """Time every row's classifier (one run each) on the same test batch, interleaved; speed-up over the dense row.

    Each classifier cuts the batch to its own ``max_length`` (from its coda_task.json)."""
    from .bench import time_interleaved

    steps = {}
    for name, directory in directories.items():
        model, tokenizer, task = load_classifier(directory)
        merge_lora(model)
        batch = tokenizer(
            data.test.texts[: preset.speed_batch],
            truncation=True,
            max_length=task["max_length"],
            padding=True,
            return_tensors="pt",
        )

        def step(model: Any = model, batch: Any = batch) -> None:
            with torch.inference_mode():
                model(**batch)

        steps[name] = step
    times = time_interleaved(steps, preset.speed_repeats, warmup=2)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {name: medians[DENSE] / median for name, median in medians.items()}


def merge_lora(model: torch.nn.Module) -> None:
    """Fold peft LoRA into the frozen weights, as a LoRA model is deployed."""
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "merge"):
            module.merge()


# --------------------------------------------------------------------------------------------------
# results.json, results.md, results.png
# --------------------------------------------------------------------------------------------------


def write_results(results: list[dict[str, Any]], preset: Preset, out_dir: Path, title: str) -> None:
    document = {"rows": results, "train_config": asdict(preset.train), "pretrain_config": asdict(preset.pretrain)}
    write_json(out_dir / "results.json", document)
    table = format_results(results) + format_routed_evidence(results)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)
    plot_results(results, out_dir / "results.png", title)


def format_results(results: list[dict[str, Any]]) -> str:
    speed_matched = any(r.get("diff_vs_speed_matched") for r in results)
    column = " Δ accuracy vs truncation as fast |" if speed_matched else ""
    lines = [
        "| model | test accuracy | macro-F1 | Δ accuracy vs dense | Δ accuracy vs truncation |"
        f"{column} eval examples/s | inference speed-up | training s/epoch | training speed-up |",
        "|---|---|---|---|---|" + "---|" * speed_matched + "---|---|---|---|",
    ]
    for r in results:
        pretrain = f" (+{r['pretrain_seconds']:.0f} s pretraining)" if r["pretrain_seconds"] else ""
        cell = f" {format_difference(r.get('diff_vs_speed_matched'))} |" if speed_matched else ""
        lines.append(
            f"| {r['name']} | {mean_and_spread(r['accuracy'], r['accuracy_std'], r['seeds'])}% "
            f"| {mean_and_spread(r['macro_f1'], r['macro_f1_std'], r['seeds'])} "
            f"| {format_difference(r['diff_vs_dense'])} | {format_difference(r['diff_vs_truncation'])} |{cell}"
            f" {r['eval_examples_per_second']:.1f} | {r['inference_speedup']:.2f}x "
            f"| {r['epoch_seconds']:.0f}{pretrain} | {r['training_speedup']:.2f}x |"
        )
    seeds = ", ".join(map(str, results[0]["seeds"]))
    spread = f"Mean ± sample std over seeds {seeds}" if len(results[0]["seeds"]) > 1 else f"One run (seed {seeds})"
    lines += [
        "",
        f"{spread}. Δ: paired differences in accuracy points (each seed against the "
        "same seed), mean ± std, against the dense adapter and against the dense adapter on the first "
        "ceil(max_length / r) tokens (the same token budget)"
        + (
            ", and against the dense adapter on the input that runs as fast as CoDA at r (measured)."
            if speed_matched
            else "."
        ),
    ]
    return "\n".join(lines)


def format_routed_evidence(results: list[dict[str, Any]]) -> str:
    """bbc-needle's second table: per routed row and layer, how often the frozen layer ran on the evidence."""
    routed = [r for r in results if r.get("routed_needle")]
    if not routed:
        return ""
    layers = list(routed[0]["routed_needle"])
    lines = [
        "",
        "",
        'Share of test texts whose needle colour / the word "access" / a distractor colour went through each '
        "frozen layer (%, mean over seeds):",
        "",
        "| model | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for r in routed:
        cells = [
            " / ".join(f"{100 * shares[name]:.0f}" for name in ("key", "access", "distractor"))
            for shares in r["routed_needle"].values()
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_and_spread(mean: float, std: float, seeds: list[int], sign: str = "") -> str:
    """``mean ± std`` in points; one seed has no spread to show."""
    text = f"{100 * mean:{sign}.1f}"
    return text if len(seeds) < 2 else f"{text} ± {100 * std:.1f}"


def format_difference(difference: dict[str, Any] | None) -> str:
    if difference is None:
        return "–"
    return mean_and_spread(difference["accuracy"], difference["accuracy_std"], difference["seeds"], sign="+")


MARKERS = {"dense": "s", "truncation": "v", "coda": "o"}


def plot_results(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (with std over seeds as error bars) against the inference speed-up; one legend entry per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9.5, 4.5))
    colours = plt.get_cmap("tab10" if len(results) <= 10 else "tab20")
    for index, r in enumerate(results):
        axis.errorbar(
            r["inference_speedup"],
            100 * r["accuracy"],
            yerr=100 * r["accuracy_std"],
            fmt=MARKERS[row_kind(r)],
            color=colours(index % colours.N),
            capsize=3,
            label=r["name"],
        )
    axis.set_xlabel("measured inference speed-up over the dense parallel adapter")
    axis.set_ylabel(f"test accuracy (%), mean ± std over {len(results[0]['seeds'])} seed(s)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def row_kind(result: dict[str, Any]) -> str:
    if result["coda_config"]["reduction"] > 1:
        return "coda"
    return "truncation" if result["truncation"] else "dense"
