"""The conditional layer: a frozen pretrained layer that runs on the router's tokens only.

For a layer input ``X`` ``[batch, n, hidden]`` (method §2)::

    I  = router's k tokens per example (sorted)           λ = soft top-k weights
    H  = X;  H[I] += λ[I] * (F(X[I]) - X[I])              heavy branch: the frozen layer on k tokens
    Y  = H + A(X)   (parallel adapter)   or   Y = H + A(H)   (series adapter)   or   Y = H   (none)

``F`` runs on the gathered, shorter sequence, so the selected tokens attend only to each other:
attention costs ``k^2`` instead of ``n^2`` and the feed-forward ``k`` rows instead of ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import BottleneckAdapter
from .routing import Router, Selection, TokenBudget, selected_first, token_budget

if TYPE_CHECKING:
    from .bindings import Binding


@dataclass
class RoutingState:
    """What the routed layers of one model share.

    ``reduction``, ``forced_position`` (the pooled token: a position, ``"last"`` or None),
    ``keep_first``/``keep_last`` (real tokens always kept at each end) and ``share_selection`` (every routed
    layer runs the first routed layer's selection, kept in ``shared``) are settings. Before every forward,
    the backbone's inputs give ``padding_mask`` (bool ``[batch, seq]``, True = token, None when there is no
    padding); the :class:`~coda_adapters.routing.TokenBudget` derived from it is
    computed once and shared by all layers. ``selections`` keeps each layer's last selection for
    :meth:`CodaModel.routing_trace`; ``layer_io`` keeps full-length layer inputs and outputs when the
    caller asks for hidden states. With ``record_dense_targets`` (layer-wise CoDA pretraining), each
    layer stores in ``dense_targets`` its output and what its frozen layer computes densely on the same input
    (that one without gradient), both ``[batch, seq, hidden]``.
    """

    reduction: float | torch.Tensor  # a float64 tensor [batch]: one r per example (a stacked model's forward)
    forced_position: int | str | None
    keep_first: int = 0
    keep_last: int = 0
    share_selection: bool = False
    shared: Selection | None = None
    padding_mask: torch.Tensor | None = None
    budget: TokenBudget | None = None
    selections: dict[int, Selection] = field(default_factory=dict)
    record_layer_io: bool = False
    layer_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    record_dense_targets: bool = False
    dense_targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    disabled: bool = False
    route: bool = True

    def start_forward(self, record_layer_io: bool) -> None:
        """Called as the backbone's forward starts."""
        self.record_layer_io = record_layer_io
        self.layer_io = {}
        self.dense_targets = {}

    def start_routing(self, padding_mask: torch.Tensor | None, route: bool = True) -> None:
        """Called as the module that runs the routed layers starts (the backbone, or T5's encoder, which
        ``generate`` runs once while the backbone runs at every step). ``route=False`` runs this call's
        layers densely (a decoder LM's tokens after its cached prompt)."""
        self.padding_mask = padding_mask
        self.route = route
        self.budget = None
        self.selections = {}
        self.shared = None

    def token_budget(self, hidden_states: torch.Tensor) -> TokenBudget:
        shape = tuple(hidden_states.shape[:2])
        if self.budget is None or tuple(self.budget.valid.shape) != shape:
            mask = self.padding_mask
            if mask is not None and tuple(mask.shape) != shape:
                raise ValueError(
                    f"the padding mask has shape {tuple(mask.shape)} but the layers got hidden states for "
                    f"[batch, seq]={shape}"
                )
            mask = None if mask is None else mask.to(hidden_states.device)
            reduction = self.reduction if self.route else 1.0
            kept = dict(keep_first=self.keep_first, keep_last=self.keep_last)
            self.budget = token_budget(mask, shape, reduction, self.forced_position, hidden_states.device, **kept)
        return self.budget

    def shared_selection(self, layer_index: int) -> Selection:
        """The selection of this forward's first routed layer, for a layer that shares it."""
        if self.shared is None:
            raise RuntimeError(
                f"layer {layer_index} shares the first routed layer's selection, but no routed layer ran before it"
            )
        return self.shared


class ConditionalLayer(nn.Module):
    """Wraps the frozen layer ``layer`` (called as a black box) with a router and an adapter.

    It is called exactly like the layer it replaces and returns the same structure. Without a router
    (``router=None``) it is an adapter-only layer that never routes: T5's decoder, and the
    ``CodaConfig.dense_layers`` of a routed model; unless ``shares_selection``: then it routes the tokens the
    first routed layer of the same forward selected (``CodaConfig.share_selection``).
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        layer_index: int,
        router: Router | None,
        adapter: BottleneckAdapter | None,
        adapter_placement: str,
        binding: Binding,
        state: RoutingState,
        shares_selection: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.router = router
        self.shares_selection = shares_selection
        self.routes = router is not None or shares_selection
        self.adapter = adapter
        self.layer_index = layer_index
        self.adapter_placement = adapter_placement
        # plain attributes, not submodules: they are shared by every layer and hold no weights
        object.__setattr__(self, "binding", binding)
        object.__setattr__(self, "state", state)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.state.disabled:
            return self.layer(hidden_states, *args, **kwargs)
        budget = self.state.token_budget(hidden_states)
        if budget.dense or not self.routes:
            output = self._dense_forward(hidden_states, budget, args, kwargs)
        else:
            output = self._routed_forward(hidden_states, budget, args, kwargs)
        output_states = self.binding.layer_hidden_states(output)
        if self.state.record_layer_io:
            self.state.layer_io[self.layer_index] = (hidden_states, output_states)
        if self.state.record_dense_targets:
            with torch.no_grad():
                dense = self.binding.layer_hidden_states(self.layer(hidden_states, *args, **kwargs))
            self.state.dense_targets[self.layer_index] = (output_states, dense)
        return output

    def _routed_forward(self, hidden_states: torch.Tensor, budget: TokenBudget, args: tuple, kwargs: dict) -> Any:
        if self.router is None:
            selection = self.state.shared_selection(self.layer_index)
        else:
            selection = self.router(hidden_states, budget)
            if self.state.share_selection:
                self.state.shared = selection
        self.state.selections[self.layer_index] = selection
        flat_index = flatten_index(selection.index, hidden_states.shape[1])

        args, kwargs = self.binding.before_routing(self.layer, hidden_states, args, kwargs)
        selected = gather_tokens(hidden_states, flat_index)
        layer_args, layer_kwargs = self.binding.routed_layer_arguments(selected, selection, args, kwargs)
        layer_output = self.layer(selected, *layer_args, **layer_kwargs)
        update = self.binding.layer_hidden_states(layer_output) - selected
        update = update * selection.weights.unsqueeze(-1).to(update.dtype)

        if self.adapter_placement == "parallel":
            output = add_tokens_(hidden_states + self.adapter(hidden_states), flat_index, update)
        else:
            output = self._after_layer(add_tokens_(hidden_states.clone(), flat_index, update))
        return self.binding.routed_layer_output(layer_output, output, args, kwargs)

    def _dense_forward(self, hidden_states: torch.Tensor, budget: TokenBudget, args: tuple, kwargs: dict) -> Any:
        """Every token is selected with λ = 1: the layer is exactly ``F(x) + A(x)``, the dense baseline.
        (A layer that never routes leaves no selection in the routing trace.)"""
        if self.routes:
            self.state.selections[self.layer_index] = dense_selection(budget)
        args, kwargs = self.binding.dense_layer_arguments(self.layer, hidden_states, args, kwargs)
        layer_output = self.layer(hidden_states, *args, **kwargs)
        full = self.binding.layer_hidden_states(layer_output)
        parallel = self.adapter_placement == "parallel"
        output = full + self.adapter(hidden_states) if parallel else self._after_layer(full)
        return self.binding.replace_hidden_states(layer_output, output)

    def _after_layer(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The series adapter on the layer's output (``"none"``: nothing, e.g. for a LoRA-only model)."""
        return hidden_states if self.adapter is None else hidden_states + self.adapter(hidden_states)


def dense_selection(budget: TokenBudget) -> Selection:
    """The :class:`Selection` that keeps every valid token, with λ = 1."""
    valid, k = budget.valid, budget.num_selected
    positions = torch.arange(valid.shape[1], device=valid.device)
    index, _ = selected_first(positions.expand_as(valid), valid)
    slot_mask = positions < k[:, None]
    return Selection(index, slot_mask, slot_mask.float(), k, all_filled=budget.uniform)


def flatten_index(index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions ``[batch, k]`` as row numbers ``[batch * k]`` of the flattened ``[batch * seq, hidden]``."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(-1) * seq_len
    return (index + offsets).reshape(-1)


def gather_tokens(hidden_states: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows ``flat_index`` of ``hidden_states`` ``[batch, n, hidden]`` -> ``[batch, k, hidden]``."""
    batch, _, hidden = hidden_states.shape
    return hidden_states.reshape(-1, hidden).index_select(0, flat_index).view(batch, -1, hidden)


def add_tokens_(hidden_states: torch.Tensor, flat_index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """In place: add ``update`` ``[batch, k, hidden]`` at rows ``flat_index`` of ``hidden_states``.

    The rows are distinct (:func:`~coda_adapters.routing.selected_first`); empty slots' updates are zero.
    """
    hidden = hidden_states.shape[-1]
    hidden_states.view(-1, hidden).index_add_(0, flat_index, update.reshape(-1, hidden))
    return hidden_states
