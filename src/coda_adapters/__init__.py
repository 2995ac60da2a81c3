"""coda-adapters: Conditional Adapters (CoDA, Lei et al. 2023) for Hugging Face Transformers.

A frozen pretrained model runs each layer on the tokens a learned router selects, while light
parallel adapters process every token: cheap to train and fast at inference.
"""

__version__ = "0.1.0"

from .adapters import BottleneckAdapter
from .bindings import Binding, register_binding, supported_model_types
from .config import CodaConfig
from .layer import ConditionalLayer
from .model import CodaModel, get_coda_model, read_coda_config
from .routing import Router, Selection, soft_topk

__all__ = [
    "Binding",
    "BottleneckAdapter",
    "CodaConfig",
    "CodaModel",
    "ConditionalLayer",
    "Router",
    "Selection",
    "get_coda_model",
    "read_coda_config",
    "register_binding",
    "soft_topk",
    "supported_model_types",
]
