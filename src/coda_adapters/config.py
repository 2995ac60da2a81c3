"""`CodaConfig`: every setting of a CoDA model, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .routing import SOFT_TOPK_METHODS

ADAPTER_KINDS = ("parallel", "series", "none")
ROUTER_KINDS = ("learned", "random")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
POOLING_KINDS = ("cls", "mean", "routed_mean")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and a help text (plus, for example, ``choices``) in its metadata,
    as peft's configs do: the ``coda`` command line builds its options from them."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class CodaConfig:
    """Settings of a CoDA model (Lei et al. 2023).

    Attributes:
        reduction: ``r >= 1``; each routed layer runs its frozen layer on ``k = ceil(n_valid / r)`` tokens.
            ``r = 1`` is the dense parallel-adapter baseline.
        adapter: ``"parallel"`` (beside the layer, on its input: ``y = F(x) + A(x)``) or ``"series"``
            (Houlsby-style, after the layer: ``y = h + A(h)``, ``h`` the layer output) or ``"none"`` (no
            adapter: with ``lora_rank > 0`` and ``reduction = 1``, a plain LoRA model).
        bottleneck: adapter width ``m``.
        scaling: factor on the adapter's output.
        activation: adapter non-linearity, one of ``ACTIVATIONS``.
        router: ``"learned"`` (one trained vector per layer) or ``"random"`` (a random choice of tokens
            each forward: the paper's ablation baseline).
        epsilon: entropy weight of the soft top-k; smaller is closer to a hard top-k.
        router_position_bins: if ``> 0``, each learned router adds a learned bias per bin of relative
            position (``t / n_valid``, in that many equal bins) to its scores; not in the paper (see ``Router``).
        straight_through: the selected tokens' updates are not scaled in the forward pass (``λ = 1``, as a
            token of the dense model; a random router's are not either), while a learned router still learns
            through the soft top-k's gradient (the straight-through estimator). Not in the paper, which scales
            by ``λ``. Measured (README): no gain on BBC News at r = 5, a loss on bbc-needle at r = 5.
        soft_topk_method: ``"exact"`` (closed form) or ``"coordinate_descent"`` (the paper's solver).
        soft_topk_iters, epsilon_init, epsilon_decay: settings of ``"coordinate_descent"``.
        layers: indices of the layers to convert; ``None`` converts all of them.
        dense_layers: indices, among the converted layers, of those that keep every token (an adapter, no
            router): as random-LTD keeps the first and last layers dense. ``None`` (or empty) routes them all.
        keep_pooled_token: always route the token a classifier head reads (``[CLS]`` for BERT).
        keep_first, keep_last: always route the first / last that many real tokens of each example, within
            ``k`` (an example with more of them than ``ceil(n_valid / r)`` runs exactly those). Not in the
            paper: the position prior that truncation has (a text's lead), and for a decoder LM the attention
            sink and the local window before the predicted token (StreamingLLM, LazyLLM).
        share_selection: every routed layer runs the tokens the first routed layer selects (one router per
            model instead of one per layer), so a token a layer runs has run through every routed layer
            before it. Not in the paper: a pretrained decoder LM cannot use tokens that skipped earlier
            layers without long CoDA pretraining (README, "SmolLM2").
        pooling: what the model's pooler gives its head: ``"cls"`` (the model's own pooler, on ``[CLS]``)
            or ``"mean"`` (the mean of the last hidden states over the real tokens, replacing the pooler,
            as sentence-transformers models are trained), or ``"routed_mean"`` (the ``λ``-weighted mean over
            the tokens the last routed layer ran through its frozen layer; see ``pooling.MeanPooler``).
        lora_rank: if ``> 0``, also put peft LoRA of this rank on the frozen layers' ``lora_target_modules``.
        lora_alpha, lora_dropout: LoRA settings (peft's meaning).
        lora_target_modules: module names for LoRA; ``None`` takes the architecture's default.
        modules_to_save: extra modules trained and saved with the adapter (the task head); ``None``
            takes the architecture's default (for example ``["classifier"]``).
    """

    reduction: float = option(
        3.0, "r: each routed layer runs its frozen layer on ceil(n/r) of the n tokens (1 = the dense parallel adapter)"
    )
    adapter: str = option(
        "parallel",
        "where the bottleneck adapter sits: beside the frozen layer, after it, or none (LoRA alone)",
        choices=ADAPTER_KINDS,
    )
    bottleneck: int = option(64, "adapter width")
    scaling: float = option(1.0, "factor on the adapter's output")
    activation: str = option("relu", "adapter non-linearity", choices=ACTIVATIONS)
    router: str = option(
        "learned", "learned routers, or a random choice of tokens (the ablation baseline)", choices=ROUTER_KINDS
    )
    epsilon: float = option(0.1, "entropy weight of the soft top-k; smaller is closer to a hard top-k")
    router_position_bins: int = option(
        0, "learned router score bias per bin of relative position t/n among the real tokens (0 = none)"
    )
    straight_through: bool = option(
        False,
        "selected tokens get the frozen layer's whole update (lambda = 1); the router learns through "
        "the soft top-k's gradient (straight-through)",
    )
    soft_topk_method: str = option(
        "exact",
        "soft top-k solver: exact closed form, or the paper's coordinate descent",
        choices=SOFT_TOPK_METHODS,
        aliases=("--soft-topk",),
    )
    soft_topk_iters: int = option(20, "coordinate-descent steps")
    epsilon_init: float = option(4.0, "coordinate descent's starting epsilon")
    epsilon_decay: float = option(0.7, "coordinate descent's epsilon decay per step")
    layers: list[int] | None = option(None, "indices of the layers to route (None: all of them)")
    dense_layers: list[int] | None = option(
        None, "indices of converted layers that run every token: an adapter but no router (None: none)"
    )
    keep_pooled_token: bool = option(True, "always route the token the classifier head reads ([CLS] for BERT)")
    keep_first: int = option(0, "always route the first N real tokens of each example (within k)")
    keep_last: int = option(0, "always route the last N real tokens of each example (within k)")
    share_selection: bool = option(
        False, "every routed layer runs the tokens the first routed layer selects (one router for the model)"
    )
    pooling: str = option(
        "cls",
        "what the classifier reads: the model's pooler on [CLS], the mean of the last hidden states, or their "
        "mean over the tokens the last routed layer processed",
        choices=POOLING_KINDS,
    )
    lora_rank: int = option(0, "rank of peft LoRA on the frozen layers (0 = none)")
    lora_alpha: float = option(16.0, "LoRA alpha (peft's meaning)")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: list[str] | None = option(
        None, "module names LoRA targets (None: the architecture's query and value projections)"
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained and saved with the adapter (None: the architecture's task head)"
    )

    def __post_init__(self) -> None:
        check_number("reduction", self.reduction, low=1)
        check_choice("adapter", self.adapter, ADAPTER_KINDS)
        check_int("bottleneck", self.bottleneck, low=1)
        check_number("scaling", self.scaling)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("router", self.router, ROUTER_KINDS)
        check_number("epsilon", self.epsilon, above=0)
        check_int("router_position_bins", self.router_position_bins, low=0)
        bins = self.router_position_bins
        require(not (bins and self.router == "random"), "router_position_bins", "0 with router='random'", bins)
        require(isinstance(self.straight_through, bool), "straight_through", "True or False", self.straight_through)
        check_choice("soft_topk_method", self.soft_topk_method, SOFT_TOPK_METHODS)
        check_int("soft_topk_iters", self.soft_topk_iters, low=1)
        check_number("epsilon_init", self.epsilon_init, above=0)
        check_number("epsilon_decay", self.epsilon_decay, above=0, high=1)
        self.layers = _layer_list("layers", self.layers, allow_empty=False)
        self.dense_layers = _layer_list("dense_layers", self.dense_layers, allow_empty=True)
        if self.layers is not None and self.dense_layers is not None:
            outside = sorted(set(self.dense_layers) - set(self.layers))
            require(not outside, "dense_layers", f"indices among layers {self.layers}", self.dense_layers)
        require(isinstance(self.keep_pooled_token, bool), "keep_pooled_token", "True or False", self.keep_pooled_token)
        check_int("keep_first", self.keep_first, low=0)
        check_int("keep_last", self.keep_last, low=0)
        require(isinstance(self.share_selection, bool), "share_selection", "True or False", self.share_selection)
        check_choice("pooling", self.pooling, POOLING_KINDS)
        check_int("lora_rank", self.lora_rank, low=0)
        check_number("lora_alpha", self.lora_alpha, above=0)
        check_number("lora_dropout", self.lora_dropout, low=0, below=1)
        for name in ("lora_target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
                require(ok, name, "None or a list of module names", value)
                setattr(self, name, list(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CodaConfig:
        """Build a config from a dict (as read from ``coda_config.json``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CodaConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)


def _layer_list(name: str, value: Any, *, allow_empty: bool) -> list[int] | None:
    """``value`` sorted, after checking it is None or a list of distinct layer indices >= 0."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0)
    ok = ok and all(_is_int(i) and i >= 0 for i in value) and len(set(value)) == len(value)
    what = "a list" if allow_empty else "a non-empty list"
    require(ok, name, f"None or {what} of distinct layer indices >= 0", value)
    return sorted(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, name, f"one of {choices}", value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    above: float | None = None,
    high: float | None = None,
    below: float | None = None,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number within the bounds given
    (``low <=``, ``above <``, ``<= high``, ``< below``)."""
    bounds = [(low, ">=", lambda v, b: v >= b), (above, ">", lambda v, b: v > b)]
    bounds += [(high, "<=", lambda v, b: v <= b), (below, "<", lambda v, b: v < b)]
    active = [(bound, sign, test) for bound, sign, test in bounds if bound is not None]
    allowed = " ".join(["a finite number", " and ".join(f"{sign} {bound:g}" for bound, sign, _ in active)]).strip()
    ok = _is_number(value) and math.isfinite(value) and all(test(value, bound) for bound, _, test in active)
    require(ok, name, allowed, value)


def check_int(name: str, value: Any, *, low: int) -> None:
    require(_is_int(value) and value >= low, name, f"an int >= {low}", value)
