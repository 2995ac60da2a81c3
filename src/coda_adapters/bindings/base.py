"""The base of every binding: where a model family keeps its layers and how to call one on routed tokens.

A binding describes a family; it does not copy its modelling code. The core wraps each frozen
Hugging Face layer as a black box and asks the binding only for what differs between families: the
path to the layer list, the pooled token, the default LoRA targets and head, and how to rebuild the
per-token arguments of a layer call (attention mask, positions) for the selected tokens.

Adding a family is one short file in this folder that subclasses :class:`Binding` and decorates it
with :func:`register_binding`, then import it in ``bindings/__init__.py`` (see the README section
"Adding an architecture").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..pooling import FirstTokenPooled
from ..routing import Selection

_REGISTRY: dict[str, type[Binding]] = {}


class Binding:
    """How CoDA plugs into one model family. Subclass it, set the class attributes, and register it.

    Class attributes:
        model_types: the Hugging Face ``config.model_type`` values this binding serves.
        layers_path: dotted path, from ``model.base_model``, to the ``nn.ModuleList`` of layers to route.
        padding_mask_argument: name of the ``forward`` argument holding the 2D padding mask ``[batch, seq]``
            (1 = token, 0 = padding) of the layers' tokens, or None if the family has none.
        padding_mask_module: dotted path, from ``model.base_model``, to the module that receives that
            argument; "" is the backbone itself. (wav2vec2's backbone gets a mask over audio samples;
            its encoder gets the one over frames.)
        pooled_token: position of the token a classifier head reads (``"last"``: the last non-padding
            token, as in causal language models), or None.
        adapter_layers_path: dotted path, from ``model.base_model``, to a layer list that gets adapters but
            is never routed (T5's decoder), or None.
        pooler_path: dotted path, from ``model.base_model``, to the pooler module whose output the
            classification head reads (replaced for the mean poolings), or None.
        first_token_head: attribute of the model holding a head that reads the first token's hidden state
            itself (RoBERTa's and MPNet's classifiers), fed the pooled states for the mean poolings.
        default_lora_targets: module names peft LoRA targets by default.
        default_modules_to_save: the task-head modules trained with the adapter.
    """

    model_types: tuple[str, ...] = ()
    layers_path: str = ""
    padding_mask_argument: str | None = "attention_mask"
    padding_mask_module: str = ""
    pooled_token: int | str | None = None
    adapter_layers_path: str | None = None
    pooler_path: str | None = None
    first_token_head: str | None = None
    default_lora_targets: tuple[str, ...] = ()
    default_modules_to_save: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.backbone = model.base_model
        self.check_supported()
        self._mask_signature = inspect.signature(self.padding_mask_receiver().forward)

    def check_supported(self) -> None:
        """Raise ``ValueError`` for variants of the family that routing cannot serve."""

    def layers(self) -> nn.ModuleList:
        return _get_submodule(self.backbone, self.layers_path)

    def adapter_layers(self) -> nn.ModuleList:
        """The layers that get adapters without routing (empty for most families)."""
        if self.adapter_layers_path is None:
            return nn.ModuleList()
        try:
            return _get_submodule(self.backbone, self.adapter_layers_path)
        except AttributeError:  # e.g. T5EncoderModel has no decoder
            return nn.ModuleList()

    def padding_mask_receiver(self) -> nn.Module:
        """The module whose forward arguments carry the layers' padding mask."""
        return _get_submodule(self.backbone, self.padding_mask_module) if self.padding_mask_module else self.backbone

    def use_pooler(self, pooler: nn.Module) -> Callable[[], None]:
        """Make the classification head read ``pooler``'s output (``[batch, seq, hidden] -> [batch, hidden]``)
        instead of the model's pooler, or, for heads that read the first token themselves (RoBERTa and
        MPNet classifiers), instead of that token. Returns a function that undoes the change."""
        parent_path, _, name = (self.pooler_path or "").rpartition(".")
        parent = _get_submodule(self.backbone, parent_path) if parent_path else self.backbone
        original = getattr(parent, name, None) if self.pooler_path else None
        if original is not None:
            setattr(parent, name, pooler)
            return lambda: setattr(parent, name, original)
        head = getattr(self.model, self.first_token_head, None) if self.first_token_head else None
        if head is None:
            raise ValueError(
                "pooling='mean' and 'routed_mean' need a classification model whose head reads a pooler or the "
                f"first token; {type(self.model).__name__} has neither: use pooling='cls'"
            )
        setattr(self.model, self.first_token_head, FirstTokenPooled(pooler, head))
        return lambda: setattr(self.model, self.first_token_head, head)

    def padding_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Bool padding mask ``[batch, seq]`` (True = token) from the receiver's forward arguments, or None."""
        if self.padding_mask_argument is None:
            return None
        bound = self._mask_signature.bind_partial(*args, **kwargs).arguments
        mask = bound.get(self.padding_mask_argument)
        if mask is None:
            return None
        if mask.dim() != 2:
            raise ValueError(
                f"{self.padding_mask_argument} must be a 2D padding mask [batch, seq] for a CoDA model, got shape "
                f"{tuple(mask.shape)}"
            )
        return mask.bool()

    def before_routing(
        self, layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """Work on the full-length call before a routed layer runs: complete arguments the layer would
        derive from its input length (T5's position bias), or write what every token needs (a KV cache).

        ``layer`` is the frozen layer, ``hidden_states`` ``[batch, n, hidden]`` its full input. Returns the
        full-length ``(args, kwargs)``, which :meth:`routed_layer_arguments` then narrows.
        """
        return args, kwargs

    def dense_layer_arguments(
        self, layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """The ``(args, kwargs)`` of a call that runs ``layer`` on every token of ``hidden_states``
        ``[batch, n, hidden]``: unchanged, except where earlier routing must be remembered (a decoder LM's
        tokens after a routed prompt see, in each layer, only the prompt tokens that layer ran)."""
        return args, kwargs

    def routed_layer_output(
        self, layer_output: Any, hidden_states: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        """What a routed layer hands on: ``layer_output`` (the frozen layer's output on the selected tokens)
        with the full-length ``hidden_states`` ``[batch, n, hidden]``. ``args``/``kwargs`` are the full-length
        call; families whose layers also pass something per token along (T5's bias) restore it from there.
        """
        return self.replace_hidden_states(layer_output, hidden_states)

    def routes_call(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether the layers route in this call of the receiver (False: they run densely). A decoder LM
        routes its prompt, not the tokens it decodes after it."""
        return True

    def routed_layer_arguments(
        self, selected_states: torch.Tensor, selection: Selection, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """The ``(args, kwargs)`` to call a frozen layer on ``selected_states`` ``[batch, k_max, hidden]``.

        ``args``/``kwargs`` are what the model passed to the layer for the full sequence.
        """
        raise NotImplementedError

    @staticmethod
    def layer_hidden_states(output: Any) -> torch.Tensor:
        """The hidden states ``[batch, seq, hidden]`` in a layer's output (a tensor or a tuple)."""
        return output[0] if isinstance(output, tuple) else output

    @staticmethod
    def replace_hidden_states(output: Any, hidden_states: torch.Tensor) -> Any:
        """A layer output of the same structure as ``output`` holding ``hidden_states``."""
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states


def gather_pairwise(bias: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows and columns ``index`` ``[batch, k]`` of a bias ``[batch or 1, heads, n, n]``: ``[batch, heads, k, k]``.

    For relative position biases: entry ``(i, j)`` of the result is the bias between the original
    positions of the ``i``-th and ``j``-th selected tokens.
    """
    batch, k = index.shape
    bias = bias.expand(batch, -1, -1, -1)
    heads, n = bias.shape[1], bias.shape[-1]
    rows = bias.gather(2, index[:, None, :, None].expand(batch, heads, k, n))
    return rows.gather(3, index[:, None, None, :].expand(batch, heads, k, k))


def _get_submodule(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def register_binding(cls: type[Binding]) -> type[Binding]:
    """Class decorator: make ``cls`` the binding of each of its ``model_types``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def binding_for(model: nn.Module) -> Binding:
    """The binding for a Hugging Face model, or a ``ValueError`` listing the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} ({type(model).__name__}); supported model "
            f"types are {supported_model_types()}. To add one, see the README section 'Adding an architecture'."
        )
    return _REGISTRY[model_type](model)
