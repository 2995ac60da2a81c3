"""Router initialisation from the frozen model: start each router scoring the tokens its layer attends to.

A router's weights start random (``Router``), so early in training its choices are noise that the
adapters must learn around. The frozen model already knows which tokens matter to it: the attention a
token *receives* in a layer (averaged over heads and queries) is the importance signal of learned token
pruning (Kim et al., 2022) and LazyLLM (Fu et al., 2024). :func:`init_routers_from_attention` runs the
frozen model once on a calibration batch and sets each learned router's weight to the ridge-regression
fit of that signal from the layer's input hidden states, the only thing a linear router sees.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import check_number
from .layer import ConditionalLayer
from .model import CodaModel


def attention_received(attentions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The attention each token receives, ``[batch, n]``, from attention probabilities ``[batch, heads, n, n]``
    (query by key): the mean over heads and over the real queries (``valid``, bool ``[batch, n]``); 0 for padding."""
    per_query = attentions.float().mean(dim=1)  # [batch, query, key]
    queries = valid.float().unsqueeze(-1)
    received = (per_query * queries).sum(dim=1) / queries.sum(dim=1).clamp(min=1)
    return received * valid


def _centred(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` ``[batch, n, ...]`` minus each example's mean over its valid tokens; padding is 0. Router
    scores only matter relative to the other tokens of the same example (the soft top-k is shift-invariant
    per row), so the fit works on per-example centred quantities."""
    mask = valid.float().view(*valid.shape, *([1] * (values.dim() - 2)))
    mean = (values * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return (values - mean) * mask


@torch.no_grad()
def init_routers_from_attention(
    model: CodaModel, inputs: Mapping[str, torch.Tensor], ridge: float = 1e-3, tokens: torch.Tensor | None = None
) -> dict[int, float]:
    """Set every learned router of ``model`` from one dense pass of its frozen model over ``inputs`` (a
    calibration batch, the keyword arguments of a forward).

    For routed layer ``i``, the target is the attention each token receives in layer ``i`` of the frozen
    model (:func:`attention_received`), and the features are the hidden states entering layer ``i``, both
    centred per example over the fitted tokens: ``tokens`` (bool ``[batch, n]``), default every real token.
    The weight is the ridge solution (``ridge`` times the features' mean variance on the diagonal), scaled so
    that scores have a standard deviation of 1 within an example, the scale of the default initialisation.
    Returns, per routed layer index, the correlation between the new scores and the target over the fitted
    tokens of the calibration batch (how much of the signal a linear router can express).

    Why a subset: in BERT-like models ``[CLS]`` and ``[SEP]`` receive most of the attention (attention sinks,
    see :func:`attention_agreement`), so a fit over every token spends itself on finding them; fitted over
    the text tokens alone, the router ranks the text as the frozen model does.
    """
    check_number("ridge", ridge, above=0)
    layers = learned_router_layers(model)
    if not layers:
        return {}
    hidden_states, attentions, valid = _dense_pass(model, inputs)
    chosen = _chosen_tokens(valid, tokens)
    fits = {}
    for index, layer in layers.items():
        features = _centred(hidden_states[index].float(), chosen)[chosen]  # [tokens, hidden]
        target = _centred(attention_received(attentions[index], valid), chosen)[chosen]  # [tokens]
        gram = features.T @ features
        diagonal = ridge * gram.diagonal().mean().clamp(min=1e-12)
        weight = torch.linalg.solve(gram + diagonal * torch.eye(gram.shape[0]), features.T @ target)
        scores = features @ weight
        weight = weight / scores.std().clamp(min=1e-12)
        layer.router.weight.copy_(weight.to(layer.router.weight.dtype))
        fits[index] = _correlation(scores, target)
    return fits


@torch.no_grad()
def attention_agreement(
    model: CodaModel, inputs: Mapping[str, torch.Tensor], tokens: torch.Tensor | None = None
) -> dict[int, float]:
    """Per routed layer with a learned router: the correlation between the router's scores and the attention
    each token receives in that layer of the frozen model (:func:`attention_received`), over ``tokens`` (bool
    ``[batch, n]``, default every real token), both centred per example over those tokens.

    Why a subset: attention sinks. In MiniLM's middle layers ``[CLS]`` and ``[SEP]`` receive almost all the
    attention (98-99% of the target's variance on bbc-needle), so a router that only finds them agrees at
    0.99 over all tokens; over the text tokens alone the same routers agree at about 0.6
    (``examples/router_init_fit.py``)."""
    hidden_states, attentions, valid = _dense_pass(model, inputs)
    chosen = _chosen_tokens(valid, tokens)
    agreement = {}
    for index, layer in learned_router_layers(model).items():
        scores = _centred(layer.router.scores(hidden_states[index]), chosen)[chosen]
        target = _centred(attention_received(attentions[index], valid), chosen)[chosen]
        agreement[index] = _correlation(scores, target)
    return agreement


def learned_router_layers(model: CodaModel) -> dict[int, ConditionalLayer]:
    """``{layer index: ConditionalLayer}`` of the routed layers whose router is learned (what these functions
    fit and measure; a random router has no weights to set)."""
    return {
        index: layer
        for index, layer in model.conditional_layers().items()
        if layer.router is not None and layer.router.kind == "learned"
    }


def _chosen_tokens(valid: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The real tokens (``valid``) that are also in ``tokens`` (bool ``[batch, n]``, None: all); an error names
    ``tokens`` when its shape differs from the batch's or when it leaves fewer than two tokens to fit."""
    if tokens is None:
        return valid
    if tokens.shape != valid.shape:
        shape, given = list(valid.shape), list(tokens.shape)
        raise ValueError(f"tokens must be a bool mask of shape {shape} (the batch), got {given}")
    chosen = valid & tokens.bool()
    if int(chosen.sum()) < 2:
        raise ValueError(f"tokens must select at least 2 real tokens of the batch, got {int(chosen.sum())}")
    return chosen


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's correlation of two ``[tokens]`` vectors."""
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _dense_pass(
    model: CodaModel, inputs: Mapping[str, torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
    """The frozen model's hidden states (``[i]`` enters layer ``i``), attention probabilities per layer and the
    bool mask of real tokens ``[batch, n]``. Attention probabilities need eager attention: the model runs
    with it for this pass and gets its own implementation back."""
    base = model.model
    implementation = base.config._attn_implementation
    was_training = model.training
    model.eval()
    base.set_attn_implementation("eager")
    try:
        with model.disable_adapters():
            out = base(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        base.set_attn_implementation(implementation)
        model.train(was_training)
    hidden_states, attentions = out.hidden_states, out.attentions
    if hidden_states is None or attentions is None:
        raise ValueError(f"{type(base).__name__} returned no hidden states or attentions: cannot calibrate routers")
    mask = inputs.get("attention_mask")
    shape = hidden_states[0].shape[:2]
    valid = torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool()
    return hidden_states, attentions, valid
