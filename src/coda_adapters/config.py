"""`CodaConfig`: every setting of a CoDA model, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .routing import SOFT_TOPK_METHODS

ADAPTER_KINDS = ("parallel", "series", "none")
ROUTER_KINDS = ("learned", "random")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
POOLING_KINDS = ("cls", "mean")


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
        soft_topk_method: ``"exact"`` (closed form) or ``"coordinate_descent"`` (the paper's solver).
        soft_topk_iters, epsilon_init, epsilon_decay: settings of ``"coordinate_descent"``.
        layers: indices of the layers to convert; ``None`` converts all of them.
        keep_pooled_token: always route the token a classifier head reads (``[CLS]`` for BERT).
        pooling: what the model's pooler gives its head: ``"cls"`` (the model's own pooler, on ``[CLS]``)
            or ``"mean"`` (the mean of the last hidden states over the real tokens, replacing the pooler,
            as sentence-transformers models are trained).
        lora_rank: if ``> 0``, also put peft LoRA of this rank on the frozen layers' ``lora_target_modules``.
        lora_alpha, lora_dropout: LoRA settings (peft's meaning).
        lora_target_modules: module names for LoRA; ``None`` takes the architecture's default.
        modules_to_save: extra modules trained and saved with the adapter (the task head); ``None``
            takes the architecture's default (for example ``["classifier"]``).
    """

    reduction: float = 3.0
    adapter: str = "parallel"
    bottleneck: int = 64
    scaling: float = 1.0
    activation: str = "relu"
    router: str = "learned"
    epsilon: float = 0.1
    soft_topk_method: str = "exact"
    soft_topk_iters: int = 20
    epsilon_init: float = 4.0
    epsilon_decay: float = 0.7
    layers: list[int] | None = None
    keep_pooled_token: bool = True
    pooling: str = "cls"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        _check_number("reduction", self.reduction, low=1)
        _check_choice("adapter", self.adapter, ADAPTER_KINDS)
        _check_int("bottleneck", self.bottleneck, low=1)
        _check_number("scaling", self.scaling)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("router", self.router, ROUTER_KINDS)
        _check_number("epsilon", self.epsilon, above=0)
        _check_choice("soft_topk_method", self.soft_topk_method, SOFT_TOPK_METHODS)
        _check_int("soft_topk_iters", self.soft_topk_iters, low=1)
        _check_number("epsilon_init", self.epsilon_init, above=0)
        _check_number("epsilon_decay", self.epsilon_decay, above=0, high=1)
        if self.layers is not None:
            ok = isinstance(self.layers, (list, tuple)) and len(self.layers) > 0
            ok = ok and all(_is_int(i) and i >= 0 for i in self.layers) and len(set(self.layers)) == len(self.layers)
            _require(ok, "layers", "None or a non-empty list of distinct layer indices >= 0", self.layers)
            self.layers = sorted(self.layers)
        _require(isinstance(self.keep_pooled_token, bool), "keep_pooled_token", "True or False", self.keep_pooled_token)
        _check_choice("pooling", self.pooling, POOLING_KINDS)
        _check_int("lora_rank", self.lora_rank, low=0)
        _check_number("lora_alpha", self.lora_alpha, above=0)
        _check_number("lora_dropout", self.lora_dropout, low=0, below=1)
        for name in ("lora_target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
                _require(ok, name, "None or a list of module names", value)
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(value in choices, name, f"one of {choices}", value)


def _check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    above: float | None = None,
    high: float | None = None,
    below: float | None = None,
) -> None:
    """A finite number within the given bounds (``low <=``, ``above <``, ``<= high``, ``< below``)."""
    bounds = [(low, ">=", lambda v, b: v >= b), (above, ">", lambda v, b: v > b)]
    bounds += [(high, "<=", lambda v, b: v <= b), (below, "<", lambda v, b: v < b)]
    active = [(bound, sign, test) for bound, sign, test in bounds if bound is not None]
    allowed = " ".join(["a finite number", " and ".join(f"{sign} {bound:g}" for bound, sign, _ in active)]).strip()
    ok = _is_number(value) and math.isfinite(value) and all(test(value, bound) for bound, _, test in active)
    _require(ok, name, allowed, value)


def _check_int(name: str, value: Any, *, low: int) -> None:
    _require(_is_int(value) and value >= low, name, f"an int >= {low}", value)
