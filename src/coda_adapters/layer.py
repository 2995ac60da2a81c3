"""The conditional layer: a frozen pretrained layer that runs on the router's tokens only.

For a layer input ``X`` ``[batch, n, hidden]`` (method §2)::

    I  = router's k tokens per example (sorted)           λ = soft top-k weights
    H  = X;  H[I] += λ[I] * (F(X[I]) - X[I])              heavy branch: the frozen layer on k tokens
    Y  = H + A(X)   (parallel adapter)   or   Y = H + A(H)   (series adapter)

``F`` runs on the gathered, shorter sequence, so the selected tokens attend only to each other:
attention costs ``k^2`` instead of ``n^2`` and the feed-forward ``k`` rows instead of ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import BottleneckAdapter
from .routing import Router, Selection

if TYPE_CHECKING:
    from .bindings import Binding


@dataclass
class RoutingState:
    """What the routed layers of one model share during a forward.

    ``padding_mask`` is set from the backbone's inputs before every forward (True = token,
    ``[batch, seq]``, None when there is no padding). ``selections`` keeps each layer's last
    :class:`~coda_adapters.routing.Selection`, for :meth:`CodaModel.routing_trace`. When the caller
    asks for hidden states, ``layer_io`` keeps each routed layer's full-length input and output.
    """

    padding_mask: torch.Tensor | None = None
    selections: dict[int, Selection] = field(default_factory=dict)
    record_layer_io: bool = False
    layer_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def start_forward(self, padding_mask: torch.Tensor | None, record_layer_io: bool) -> None:
        self.padding_mask = padding_mask
        self.selections = {}
        self.record_layer_io = record_layer_io
        self.layer_io = {}


class ConditionalLayer(nn.Module):
    """Wraps the frozen layer ``layer`` (called as a black box) with a router and an adapter.

    It is called exactly like the layer it replaces and returns the same structure.
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        layer_index: int,
        router: Router,
        adapter: BottleneckAdapter,
        adapter_placement: str,
        binding: Binding,
        state: RoutingState,
        keep_pooled_token: bool,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.router = router
        self.adapter = adapter
        self.layer_index = layer_index
        self.adapter_placement = adapter_placement
        self.keep_pooled_token = keep_pooled_token
        # plain attributes, not submodules: they are shared by every layer and hold no weights
        object.__setattr__(self, "binding", binding)
        object.__setattr__(self, "state", state)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        valid = self._valid_tokens(hidden_states)
        selection = self.router(hidden_states, valid, self._forced_tokens(valid))
        self.state.selections[self.layer_index] = selection

        selected = gather_tokens(hidden_states, selection.index)
        layer_args, layer_kwargs = self.binding.routed_layer_arguments(selected, selection, args, kwargs)
        layer_output = self.layer(selected, *layer_args, **layer_kwargs)
        selected_output = self.binding.layer_hidden_states(layer_output)

        update = (selected_output - selected) * selection.weights.unsqueeze(-1).to(selected.dtype)
        mixed = scatter_add_tokens(hidden_states, selection.index, update)
        if self.adapter_placement == "parallel":
            output = mixed + self.adapter(hidden_states)
        else:
            output = mixed + self.adapter(mixed)

        if self.state.record_layer_io:
            self.state.layer_io[self.layer_index] = (hidden_states, output)
        return self.binding.replace_hidden_states(layer_output, output)

    def _valid_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq = hidden_states.shape[:2]
        mask = self.state.padding_mask
        if mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=hidden_states.device)
        if mask.shape != (batch, seq):
            raise ValueError(
                f"the padding mask has shape {tuple(mask.shape)} but layer {self.layer_index} got hidden states "
                f"for [batch, seq]=({batch}, {seq})"
            )
        return mask.to(hidden_states.device)

    def _forced_tokens(self, valid: torch.Tensor) -> torch.Tensor | None:
        position = self.binding.pooled_token
        if not self.keep_pooled_token or position is None:
            return None
        forced = torch.zeros_like(valid)
        forced[:, position] = True
        return forced


def gather_tokens(hidden_states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[batch, k]`` of ``hidden_states`` ``[batch, n, hidden]`` -> ``[batch, k, hidden]``."""
    return hidden_states.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))


def scatter_add_tokens(hidden_states: torch.Tensor, index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` with ``update`` ``[batch, k, hidden]`` added at rows ``index`` ``[batch, k]``.

    Indices within a row are distinct except for empty slots, whose update is zero.
    """
    return hidden_states.scatter_add(1, index.unsqueeze(-1).expand_as(update), update)
