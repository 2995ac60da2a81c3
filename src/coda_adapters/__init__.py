"""coda-adapters: Conditional Adapters (CoDA, Lei et al. 2023) for Hugging Face Transformers.

A frozen pretrained model runs each layer on the tokens a learned router selects, while light
parallel adapters process every token: cheap to train and fast at inference.

This package is the library (it needs torch, transformers, safetensors and peft). The ``coda``
command line, training jobs, benchmarks and demos live in :mod:`coda_adapters.app`, which imports
the library and is never imported by it.
"""

from .adapters import BottleneckAdapter
from .bindings import Binding, register_binding, supported_model_types
from .checkpoint import read_coda_config
from .config import CodaConfig
from .layer import ConditionalLayer
from .model import CodaModel, get_coda_model
from .routing import Router, Selection, router_z_loss, soft_topk
from .stacking import StackedCodaModel, can_stack, check_stackable, stack_key
from .version import __version__

__all__ = [
    "Binding",
    "BottleneckAdapter",
    "CodaConfig",
    "CodaModel",
    "ConditionalLayer",
    "Router",
    "Selection",
    "StackedCodaModel",
    "__version__",
    "can_stack",
    "check_stackable",
    "get_coda_model",
    "read_coda_config",
    "register_binding",
    "router_z_loss",
    "soft_topk",
    "stack_key",
    "supported_model_types",
]
