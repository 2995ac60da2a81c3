"""Several CoDA adapters of one frozen base model in one batched forward: a per-example adapter index.

Adapters trained on the same base model differ only in their small trainable weights: the routers'
vectors, the bottleneck adapters and the task heads. :class:`StackedCodaModel` stacks each of those
weights along a new leading axis ``A`` (one slice per adapter) and, in every forward, gathers for
example ``b`` the slice ``adapter_index[b]``:

- a router's scores are ``einsum("bnh,bh->bn", x, W[adapter_index])`` (``W`` is ``[A, hidden]``);
- a trainable ``nn.Linear`` (the adapters' down and up projections, the head) is a batched matrix
  product with ``W[adapter_index]`` ``[batch, out, in]``.

The conditional layers, the bottleneck adapters and the frozen layers run unchanged: only their
``Router`` and trainable ``nn.Linear`` modules are swapped for stacked ones, which read the forward's
adapter index from a shared :class:`StackState` (as the layers read their padding mask from the
``RoutingState``). Each example is then computed exactly as its own adapter computes it alone; the
frozen layers run once for the whole mixed batch.

Which models stack (:func:`check_stackable`): the same frozen base weights, model class, routed and dense
layers, adapter placement, bottleneck, scaling, activation, router settings and pooling, the same
trainable parameters, and no LoRA. The reduction ``r`` may differ (each example gets its own ``k``), and
so may the label count: logits are padded to the largest one with ``-inf``, so that a softmax gives the
padded labels probability 0 and the others exactly what the adapter alone gives.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .config import CodaConfig
from .model import CodaModel
from .routing import Router, relative_position_bins

# CodaConfig fields that need not match: each example gets its own r; LoRA must be off (checked apart);
# modules_to_save is compared as the trainable parameters it gives
UNSTACKED_FIELDS = ("reduction", "modules_to_save", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
LABELS = "labels"  # stands for the label count in the shapes a stack key lists


@dataclass
class StackState:
    """What the stacked modules of one :class:`StackedCodaModel` share: the adapter of each example in the
    current forward, a LongTensor ``[batch]`` (None outside a forward)."""

    adapter_index: torch.Tensor | None = None

    def index_for(self, inputs: torch.Tensor) -> torch.Tensor:
        """The adapter index ``[batch]`` for a stacked module's ``inputs`` ``[batch, ...]``."""
        index = self.adapter_index
        if index is None:
            raise RuntimeError("stacked modules run inside StackedCodaModel.forward(..., adapter_index=...)")
        if inputs.shape[0] != index.shape[0]:
            raise ValueError(
                f"adapter_index has {index.shape[0]} entries but a stacked module got inputs of shape "
                f"{tuple(inputs.shape)}: give one adapter index per example"
            )
        return index


class StackedRouter(Router):
    """The routers of one layer of ``A`` adapters: example ``b`` is scored with router ``adapter_index[b]``.

    Selection and soft top-k are :class:`Router`'s own (the routers' settings are the same); only the
    scores are per example. ``weight`` is ``[A, hidden]``, ``position_bias`` (if any) ``[A, bins]``.
    """

    def __init__(self, routers: Sequence[Router], state: StackState) -> None:
        first = routers[0]
        super().__init__(
            first.weight.shape[-1],
            kind=first.kind,
            epsilon=first.epsilon,
            method=first.method,
            position_bins=0,  # set below, stacked
            **first.coordinate_descent_options,
        )
        self.weight = nn.Parameter(torch.stack([router.weight.detach() for router in routers]), requires_grad=False)
        if first.position_bias is not None:
            biases = torch.stack([router.position_bias.detach() for router in routers])
            self.position_bias = nn.Parameter(biases, requires_grad=False)
        object.__setattr__(self, "stack_state", state)  # shared, holds no weights

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scores ``[batch, n]`` in float32 for hidden states ``[batch, n, hidden]``, each row with its router."""
        if self.kind == "random":
            return super().scores(hidden_states)
        weight = self.weight.float()[self.stack_state.index_for(hidden_states)]  # [batch, hidden]
        return torch.einsum("bnh,bh->bn", hidden_states.float(), weight)

    def position_scores(self, valid: torch.Tensor) -> torch.Tensor:
        """Position biases ``[batch, n]``, each row with its router's."""
        bias = self.position_bias.float()[self.stack_state.index_for(valid)]  # [batch, bins]
        return bias.gather(-1, relative_position_bins(valid, bias.shape[-1]))


class StackedLinear(nn.Module):
    """The ``nn.Linear`` of ``A`` adapters at one place: ``[batch, ..., in] -> [batch, ..., out]``, example ``b``
    through linear ``adapter_index[b]``.

    ``weight`` is ``[A, out, in]`` and ``bias`` ``[A, out]`` (zero for linears without one). Linears with
    fewer outputs than ``out`` (task heads with fewer labels) are padded with zero weights and a ``-inf``
    bias: their extra logits are ``-inf``, which a softmax turns into probability 0.
    """

    def __init__(self, linears: Sequence[nn.Linear], state: StackState) -> None:
        super().__init__()
        first = linears[0].weight
        out_features = max(linear.out_features for linear in linears)
        weight = first.new_zeros(len(linears), out_features, first.shape[1])
        bias = first.new_full((len(linears), out_features), float("-inf"))
        with torch.no_grad():
            for slot, linear in enumerate(linears):
                weight[slot, : linear.out_features] = linear.weight
                bias[slot, : linear.out_features] = 0 if linear.bias is None else linear.bias
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        object.__setattr__(self, "stack_state", state)  # shared, holds no weights

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        index = self.stack_state.index_for(inputs)
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])  # [batch, tokens, in]
        out = torch.baddbmm(self.bias[index].unsqueeze(1), rows, self.weight[index].transpose(1, 2))
        return out.reshape(*inputs.shape[:-1], out.shape[-1])


# --------------------------------------------------------------------------------------------------
# Which models stack
# --------------------------------------------------------------------------------------------------


def stack_key(model: CodaModel) -> tuple[tuple[str, Any], ...]:
    """What must be equal for models to stack, besides their frozen base weights' values: ``(field, value)``
    pairs, hashable. Models with equal keys and equal frozen weights stack (see :func:`check_stackable`).

    Trainable parameters are listed with their shapes, a head's label dimension as ``"labels"`` (label
    counts may differ); frozen parameters and buffers with their shapes (their values are compared apart).
    """
    if not isinstance(model, CodaModel):
        raise ValueError(f"only CodaModels stack, got {type(model).__name__}")
    config = model.coda_config
    settings = [(f.name, _hashable(getattr(config, f.name))) for f in fields(CodaConfig)]
    return (
        ("model class", type(model.model).__qualname__),
        *[(name, value) for name, value in settings if name not in UNSTACKED_FIELDS],
        ("trainable parameters", tuple(_trainable_layout(model).items())),
        ("frozen parameters and buffers", tuple((name, tuple(t.shape)) for name, t in _frozen_tensors(model).items())),
    )


def check_stackable(models: Sequence[CodaModel]) -> None:
    """Raise ``ValueError`` naming what differs (a setting, a parameter) unless ``models`` can stack."""
    if not models:
        raise ValueError("stacking needs at least one CodaModel")
    for position, model in enumerate(models):
        if not isinstance(model, CodaModel):
            raise ValueError(f"only CodaModels stack; model {position} is a {type(model).__name__}")
        if model.coda_config.lora_rank > 0:
            raise ValueError(
                f"model {position} has LoRA (lora_rank={model.coda_config.lora_rank}): LoRA inside the frozen "
                "layers cannot be stacked"
            )
        _check_trainable_modules(model, position)
    keys = [dict(stack_key(model)) for model in models]
    for field_name, value in keys[0].items():
        differing = [position for position, key in enumerate(keys) if key[field_name] != value]
        if differing:
            other = differing[0]
            raise ValueError(
                f"cannot stack these models: they differ in {field_name} "
                f"({_difference(value, keys[other][field_name], other)})"
            )
    _check_same_frozen_weights(models)


def can_stack(models: Sequence[CodaModel]) -> bool:
    """Whether ``models`` can run as one :class:`StackedCodaModel` (:func:`check_stackable` says why not)."""
    try:
        check_stackable(models)
    except ValueError:
        return False
    return True


def _check_trainable_modules(model: CodaModel, position: int) -> None:
    """Only routers and ``nn.Linear`` layers have stacked forms: any other trainable module is an error."""
    owners = dict(model.model.named_modules())
    for name, parameter in model.model.named_parameters():
        owner = owners[name.rpartition(".")[0]]
        if parameter.requires_grad and not isinstance(owner, (Router, nn.Linear)):
            raise ValueError(
                f"cannot stack model {position}: its trainable parameter {name} belongs to a "
                f"{type(owner).__name__}; only routers and nn.Linear layers (adapters, heads) can be stacked"
            )


def _check_same_frozen_weights(models: Sequence[CodaModel]) -> None:
    """The frozen parameters and buffers must be the same tensors (shared storage) or equal ones."""
    reference = _frozen_tensors(models[0])
    for position, model in enumerate(models[1:], start=1):
        for name, tensor in _frozen_tensors(model).items():
            mine = reference[name]
            same = mine.data_ptr() == tensor.data_ptr() and mine.dtype == tensor.dtype
            if not (same or torch.equal(mine, tensor)):
                raise ValueError(
                    f"cannot stack these models: the frozen base weights differ ({name} in model 0 and model "
                    f"{position}); stacked adapters must share one base model"
                )


def _frozen_tensors(model: CodaModel) -> dict[str, torch.Tensor]:
    """Frozen parameters and buffers by name, without the routers' weights (a random router's is frozen
    and unused)."""
    routers = {name for name, module in model.model.named_modules() if isinstance(module, Router)}
    tensors = {name: p for name, p in model.model.named_parameters() if not p.requires_grad}
    tensors.update(dict(model.model.named_buffers()))
    return {name: t for name, t in tensors.items() if name.rpartition(".")[0] not in routers}


def _trainable_layout(model: CodaModel) -> dict[str, tuple[Any, ...]]:
    """Trainable parameter names and shapes; the output dimension of a head's label linear is ``"labels"``."""
    labels = _label_linears(model)
    layout = {}
    for name, parameter in model.model.named_parameters():
        if parameter.requires_grad:
            shape: tuple[Any, ...] = tuple(parameter.shape)
            if name.rpartition(".")[0] in labels:
                shape = (LABELS, *shape[1:])
            layout[name] = shape
    return layout


def _label_linears(model: CodaModel) -> set[str]:
    """Names of the trainable linears that give the logits: in a task head, with one output per label."""
    heads = {id(module) for module in model._head_modules()}
    num_labels = getattr(model.model.config, "num_labels", None)
    found = set()
    for head_name, head in model.model.named_modules():
        if id(head) not in heads:
            continue
        for name, module in head.named_modules(prefix=head_name):
            if isinstance(module, nn.Linear) and module.out_features == num_labels and module.weight.requires_grad:
                found.add(name)
    return found


def _difference(first: Any, other: Any, position: int) -> str:
    """What differs between model 0's ``first`` and model ``position``'s ``other``; for ``(name, shape)``
    listings, the first name that is missing from one or has another shape."""
    if _is_listing(first) and _is_listing(other):
        mine, theirs = dict(first), dict(other)
        for name in [*mine, *theirs]:
            if mine.get(name) != theirs.get(name):
                return (
                    f"{name}: {mine.get(name, 'absent')} in model 0, {theirs.get(name, 'absent')} in model {position}"
                )
    return f"model 0: {first!r}, model {position}: {other!r}"


def _is_listing(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(item, tuple) and len(item) == 2 for item in value)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------------
# The stacked model
# --------------------------------------------------------------------------------------------------


class StackedCodaModel(nn.Module):
    """``A`` CoDA models of one frozen base in one model: each example runs with the adapter it names.

    Built from models that :func:`check_stackable` accepts; it shares their frozen tensors (those of
    ``models[0]``, which the others equal) and holds the routers, adapters and heads stacked. The models
    themselves are left as they were. Call it as the base model, plus ``adapter_index``; the outputs are
    the base model's, with ``logits`` ``[batch, max(num_labels)]`` (``-inf`` past an adapter's labels).
    It is meant for inference: the stacked weights do not train.

    Attributes:
        num_labels: each adapter's label count (its logits are ``logits[:, :num_labels[a]]``).
        reductions: each adapter's reduction ``r`` (examples are routed at their own adapter's).
        coda_model: the inner :class:`CodaModel` with the stacked modules (its ``routing_trace()`` covers
            the last forward).
    """

    def __init__(self, models: Sequence[CodaModel]) -> None:
        check_stackable(models)
        super().__init__()
        self.stack_state = StackState()
        self.num_labels = [int(model.model.config.num_labels) for model in models]
        self.reductions = [float(model.reduction) for model in models]
        self.coda_model = _copy_sharing_frozen_tensors(models[0])
        self.coda_model.eval()
        self._stack_modules(models)

    @property
    def num_adapters(self) -> int:
        return len(self.num_labels)

    def forward(self, *args: Any, adapter_index: torch.Tensor, **kwargs: Any) -> Any:
        """The base model's forward on a batch whose example ``b`` uses adapter ``adapter_index[b]``.

        Args:
            adapter_index: LongTensor ``[batch]``, values in ``0 .. num_adapters - 1``.
            args, kwargs: what the base model takes (``input_ids``, ``attention_mask``, ...); no ``labels``.
        """
        if kwargs.get("labels") is not None:
            raise ValueError("a StackedCodaModel computes no loss (its logits are padded); pass no labels")
        index = self._checked_index(adapter_index)
        state = self.coda_model.routing_state
        reduction = state.reduction
        self.stack_state.adapter_index = index
        if len(set(self.reductions)) > 1:
            table = torch.tensor(self.reductions, dtype=torch.float64, device=index.device)
            state.reduction = table[index]
        try:
            return self.coda_model(*args, **kwargs)
        finally:
            self.stack_state.adapter_index = None
            state.reduction = reduction

    def routing_trace(self) -> dict[int, torch.Tensor]:
        """:meth:`CodaModel.routing_trace` of the last forward (each example routed by its adapter)."""
        return self.coda_model.routing_trace()

    def _checked_index(self, adapter_index: torch.Tensor) -> torch.Tensor:
        """``adapter_index`` as a LongTensor ``[batch]`` on the model's device, after checking its values."""
        index = torch.as_tensor(adapter_index)
        if index.dim() != 1 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(f"adapter_index must be an integer tensor [batch], got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_adapters):
            raise ValueError(f"adapter_index values must be in 0..{self.num_adapters - 1}, got {index.tolist()}")
        device = next(self.coda_model.parameters()).device
        return index.to(device=device, dtype=torch.long)

    def _stack_modules(self, models: Sequence[CodaModel]) -> None:
        """Replace each router and trainable ``nn.Linear`` of the inner model by its stacked form."""
        inner = self.coda_model.model
        for name, module in list(inner.named_modules()):
            if isinstance(module, Router):
                stacked: nn.Module = StackedRouter([m.model.get_submodule(name) for m in models], self.stack_state)
            elif isinstance(module, nn.Linear) and module.weight.requires_grad:
                stacked = StackedLinear([m.model.get_submodule(name) for m in models], self.stack_state)
            else:
                continue
            parent, _, attribute = name.rpartition(".")
            setattr(inner.get_submodule(parent), attribute, stacked.to(module.weight.device))


def _copy_sharing_frozen_tensors(model: CodaModel) -> CodaModel:
    """A deep copy of ``model`` whose frozen parameters are ``model``'s own tensors (no second copy of the base).

    Its routers and trainable linears are replaced right after; the rest (layers, hooks, routing state,
    config) is the copy's own, so the original model is never changed.
    """
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo=shared)
