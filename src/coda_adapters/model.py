"""Wrap a pretrained Hugging Face model as a CoDA model; save and load the adapter alone."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import BottleneckAdapter
from .bindings import Binding, binding_for
from .checkpoint import WEIGHTS_NAME, check_adapter_weights, read_adapter_weights, read_coda_config, write_adapter
from .config import CodaConfig, check_number
from .layer import ConditionalLayer, RoutingState
from .pooling import MeanPooler
from .routing import Router, router_z_loss


class CodaModel(nn.Module):
    """A pretrained model whose layers run on router-selected tokens, with adapters on every token.

    Call it exactly like the wrapped model: same arguments, same outputs. Only the routers, adapters,
    LoRA (if any) and the task head are trainable; everything pretrained stays frozen.
    Build one with :func:`get_coda_model` or :meth:`CodaModel.from_pretrained`.
    """

    def __init__(self, model: nn.Module, config: CodaConfig) -> None:
        super().__init__()
        self.coda_config = config
        self.binding = binding_for(model)
        pooled = self.binding.pooled_token if config.keep_pooled_token else None
        self.routing_state = RoutingState(
            reduction=config.reduction,
            forced_position=pooled,
            keep_first=config.keep_first,
            keep_last=config.keep_last,
            share_selection=config.share_selection,
        )
        # adapter-only layers (T5's decoder) never route: a state of reduction 1 keeps them dense
        self.adapter_state = RoutingState(reduction=1.0, forced_position=None)
        self.layer_indices = _layer_indices(config, self.binding)
        _check_dense_layers(config, self.layer_indices)
        self.model = model
        self._original_layers: dict[int, nn.Module] = {}
        self._original_adapter_layers: dict[int, nn.Module] = {}
        self._restore_pooler: Callable[[], None] | None = None
        self._hooks: list[Any] = []
        # every check comes before the first change to the model, so that a bad config changes nothing
        head_modules = self._head_modules()
        if config.pooling != "cls":
            pooler = MeanPooler(self.routing_state, routed=config.pooling == "routed_mean")
            self._restore_pooler = self.binding.use_pooler(pooler)
        _freeze(model)
        if config.lora_rank > 0:
            _inject_lora(model, config, self.binding, self.layer_indices)
        self._wrap_layers()
        for module in head_modules:
            module.requires_grad_(True)
        self._install_hooks()

    # -- forward --------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped model (``config``, ``generate``, ...) are reachable on the CoDA model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set up yet (inside copy.deepcopy, for example)
                raise
            return getattr(self.model, name)

    @property
    def reduction(self) -> float:
        """The reduction the routed layers run at now. It starts at ``coda_config.reduction``, which is what
        is saved; a training schedule may change it (``coda train --reduction-warmup`` starts at 1)."""
        return self.routing_state.reduction

    @reduction.setter
    def reduction(self, value: float) -> None:
        check_number("reduction", value, low=1)
        self.routing_state.reduction = float(value)

    @property
    def epsilon(self) -> float:
        """The soft top-k's entropy weight ε the learned routers use now. It starts at ``coda_config.epsilon``,
        which is what is saved; a training schedule may change it (``coda train --epsilon-start``)."""
        routers = self._routers()
        return routers[0].epsilon if routers else self.coda_config.epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        check_number("epsilon", value, above=0)
        for router in self._routers():
            router.epsilon = float(value)

    def _routers(self) -> list[Router]:
        return [layer.router for layer in self.conditional_layers().values() if layer.router is not None]

    def routing_trace(self) -> dict[int, torch.Tensor]:
        """For the last forward: per routed layer index, a LongTensor ``[batch, k_max]`` of the positions
        the frozen layer processed, ascending, ``-1`` where an example had fewer than ``k_max``."""
        return {index: selection.trace() for index, selection in sorted(self.routing_state.selections.items())}

    def router_z_loss(self) -> torch.Tensor:
        """The router z-loss of the last forward in training mode (:func:`~coda_adapters.routing.router_z_loss`):
        a scalar to add to the task loss with a small weight (ST-MoE used 1e-3); zero when no learned router
        routed (r = 1, random routers, the dense start of training)."""
        return router_z_loss(self.routing_state.selections.values())

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the frozen base model inside this block: no routing, no adapters, LoRA switched off.

        The pooling set by ``CodaConfig.pooling`` and the head stay. Useful as a teacher (CoDA pretraining).
        """
        lora_layers = [m for m in self.model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
        self.routing_state.disabled = self.adapter_state.disabled = True
        for module in lora_layers:
            module.enable_adapters(False)
        try:
            yield
        finally:
            self.routing_state.disabled = self.adapter_state.disabled = False
            for module in lora_layers:
                module.enable_adapters(True)

    def conditional_layers(self) -> dict[int, ConditionalLayer]:
        layers = self.binding.layers()
        return {index: layers[index] for index in self.layer_indices}

    # -- parameters -----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that make up the adapter: every trainable parameter, keyed by its name in ``model``."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    # -- save / load ----------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``coda_config.json`` and ``coda_model.safetensors`` (trainable weights only)."""
        write_adapter(save_directory, self.trainable_state_dict(), self.coda_config, self.model)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_directory: str | os.PathLike) -> CodaModel:
        """Wrap ``base_model`` with the adapter saved in ``adapter_directory``.

        The files are read and checked against ``base_model`` before it is touched; if the weights do
        not fit, the base model is restored and a ``ValueError`` names the file and the problem.
        """
        directory = Path(adapter_directory)
        config = read_coda_config(directory, base_model)
        tensors = read_adapter_weights(directory / WEIGHTS_NAME)
        coda_model = cls(base_model, config)
        try:
            coda_model.load_trainable_state_dict(tensors, source=directory / WEIGHTS_NAME)
        except ValueError:
            coda_model.unload()
            raise
        return coda_model

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor], *, source: str | os.PathLike = "") -> None:
        """Copy ``tensors`` into the trainable parameters; every name and shape must match exactly."""
        parameters = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        check_adapter_weights(tensors, parameters, source)
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor)

    def unload(self) -> nn.Module:
        """Remove routing and adapters and give back the base model with its original layers.

        LoRA layers injected by ``lora_rank`` stay (use peft's tools to merge or remove them).
        """
        layers, adapter_layers = self.binding.layers(), self.binding.adapter_layers()
        for index, original in self._original_layers.items():
            layers[index] = original
        for index, original in self._original_adapter_layers.items():
            adapter_layers[index] = original
        if self._restore_pooler is not None:
            self._restore_pooler()
            self._restore_pooler = None
        for hook in self._hooks:
            hook.remove()
        self._original_layers, self._original_adapter_layers, self._hooks = {}, {}, []
        return self.model

    # -- construction ---------------------------------------------------------------------------

    def _wrap_layers(self) -> None:
        """Replace each routed layer (and each adapter-only layer) by a :class:`ConditionalLayer` around it."""
        layers, adapter_layers = self.binding.layers(), self.binding.adapter_layers()
        dense = set(self.coda_config.dense_layers or ())
        routed = [index for index in self.layer_indices if index not in dense]
        for index in self.layer_indices:
            self._original_layers[index] = layers[index]
            # no router: every token and an adapter, unless the layer shares the first routed layer's selection
            shares = self.coda_config.share_selection and index in routed[1:]
            router = None if index in dense or shares else self._router()
            layers[index] = self._conditional_layer(layers[index], index, router, self.routing_state, shares)
        for index, original in enumerate(adapter_layers):
            self._original_adapter_layers[index] = original
            adapter_layers[index] = self._conditional_layer(original, index, None, self.adapter_state)

    def _router(self) -> Router:
        config = self.coda_config
        router = Router(
            self.model.config.hidden_size,
            kind=config.router,
            epsilon=config.epsilon,
            method=config.soft_topk_method,
            iters=config.soft_topk_iters,
            epsilon_init=config.epsilon_init,
            epsilon_decay=config.epsilon_decay,
            position_bins=config.router_position_bins,
            straight_through=config.straight_through,
        )
        router.weight.requires_grad_(config.router == "learned")
        return router

    def _conditional_layer(
        self, original: nn.Module, index: int, router: Router | None, state: RoutingState, shares: bool = False
    ) -> ConditionalLayer:
        config = self.coda_config
        weight = next(original.parameters())
        adapter = None
        if config.adapter != "none":
            adapter = BottleneckAdapter(
                self.model.config.hidden_size,
                config.bottleneck,
                scaling=config.scaling,
                activation=config.activation,
                dtype=weight.dtype,
            ).to(weight.device)
        return ConditionalLayer(
            original,
            layer_index=index,
            router=None if router is None else router.to(weight.device),
            adapter=adapter,
            adapter_placement=config.adapter,
            binding=self.binding,
            state=state,
            shares_selection=shares,
        )

    def _head_modules(self) -> list[nn.Module]:
        """The modules trained and saved with the adapter (``modules_to_save``, else the binding's default)."""
        explicit = self.coda_config.modules_to_save
        names = list(self.binding.default_modules_to_save) if explicit is None else explicit
        found: dict[str, list[nn.Module]] = {name: [] for name in names}
        for module_name, module in self.model.named_modules():
            for name in names:
                if module_name == name or module_name.endswith("." + name):
                    found[name].append(module)
        missing = [name for name, modules in found.items() if not modules]
        if explicit is not None and missing:
            raise ValueError(f"modules_to_save names {missing}, which {type(self.model).__name__} does not have")
        return [module for modules in found.values() for module in modules]

    def _install_hooks(self) -> None:
        """Start each forward from the backbone's inputs, whatever entry point the caller uses: reset the
        routing state and read the padding mask (from the backbone or the submodule the binding names).

        The hooks are bound methods, so that ``copy.deepcopy`` points the copy's hooks at the copy.
        """
        backbone, receiver = self.binding.backbone, self.binding.padding_mask_receiver()
        self._hooks.append(backbone.register_forward_pre_hook(self._start_forward, with_kwargs=True))
        self._hooks.append(backbone.register_forward_hook(self._finish_forward, with_kwargs=True))
        if receiver is not backbone:
            self._hooks.append(receiver.register_forward_pre_hook(self._read_padding_mask, with_kwargs=True))

    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        wants_hidden = kwargs.get("output_hidden_states", module.config.output_hidden_states)
        self.routing_state.start_forward(record_layer_io=bool(wants_hidden))
        if self.binding.padding_mask_receiver() is module:
            self._read_padding_mask(module, args, kwargs)

    def _read_padding_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.routing_state.start_routing(
            self.binding.padding_mask(args, kwargs), route=self.binding.routes_call(args, kwargs)
        )

    def _finish_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self.routing_state
        if state.record_layer_io and getattr(output, "hidden_states", None) is not None:
            output.hidden_states = _full_length_hidden_states(output.hidden_states, state.layer_io)
        state.record_layer_io, state.layer_io = False, {}
        return output


def get_coda_model(model: nn.Module, config: CodaConfig | None = None) -> CodaModel:
    """Turn a pretrained Hugging Face model into a :class:`CodaModel` (in place: ``model`` becomes part of it).

    Args:
        model: a supported ``…Model`` or ``…ForSequenceClassification`` (see ``supported_model_types()``).
        config: the CoDA settings; the defaults are ``CodaConfig()`` (r = 3, parallel adapters).
    """
    if config is None:
        config = CodaConfig()
    if not isinstance(config, CodaConfig):
        raise ValueError(f"config must be a CodaConfig, got {type(config).__name__}")
    if isinstance(model, CodaModel):
        raise ValueError("model is already a CodaModel; call get_coda_model on the base model")
    if type(model).__module__.startswith("peft"):
        raise ValueError(
            "model is a peft model; pass the base Hugging Face model and set CodaConfig(lora_rank=...) to add LoRA"
        )
    return CodaModel(model, config)


# -- helpers --------------------------------------------------------------------------------------


def _layer_indices(config: CodaConfig, binding: Binding) -> list[int]:
    num_layers = len(binding.layers())
    if config.layers is None:
        return list(range(num_layers))
    out_of_range = [i for i in config.layers if i >= num_layers]
    if out_of_range:
        raise ValueError(f"layers {out_of_range} do not exist: the model has layers 0..{num_layers - 1}")
    return list(config.layers)


def _check_dense_layers(config: CodaConfig, layer_indices: list[int]) -> None:
    outside = sorted(set(config.dense_layers or ()) - set(layer_indices))
    if outside:
        raise ValueError(f"dense_layers {outside} are not among the converted layers {layer_indices}")


def _freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def _inject_lora(model: nn.Module, config: CodaConfig, binding: Binding, layer_indices: list[int]) -> None:
    """Put peft LoRA on the frozen layers' projections; in a routed layer it then sees the selected tokens."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = config.lora_target_modules or list(binding.default_lora_targets)
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=layer_indices,
    )
    inject_adapter_in_model(lora_config, model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)


def _full_length_hidden_states(
    hidden_states: tuple[torch.Tensor, ...], layer_io: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, ...]:
    """Hugging Face records a routed layer's inner call (selected tokens only); put back the full sequence.

    ``hidden_states[0]`` is the first layer's input, ``hidden_states[i + 1]`` layer ``i``'s output.
    """
    states = list(hidden_states)
    for index, (layer_input, layer_output) in layer_io.items():
        if index == 0:
            states[0] = layer_input
        states[index + 1] = layer_output
    return tuple(states)
