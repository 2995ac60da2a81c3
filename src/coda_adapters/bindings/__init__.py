"""Per-architecture bindings: one short file per model family, registered by ``config.model_type``.

``base.py`` holds the :class:`Binding` base class and the registry; importing a family's file
registers it. To add a family, see the README section "Adding an architecture".
"""

from . import bert, llama, mpnet, t5, vit, wav2vec2  # noqa: F401  (registers the built-in bindings)
from .base import Binding, binding_for, gather_pairwise, register_binding, supported_model_types

__all__ = ["Binding", "binding_for", "gather_pairwise", "register_binding", "supported_model_types"]
