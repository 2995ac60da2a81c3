"""The light branch: a bottleneck adapter, used in parallel or in series with the frozen layer.

LoRA is not here: it comes from ``peft`` (see ``CodaConfig.lora_rank``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class BottleneckAdapter(nn.Module):
    """``A(x) = scaling * up(act(down(x)))`` on hidden states ``[batch, seq, hidden]``.

    The up-projection starts at zero, so a freshly added adapter changes nothing: training starts
    from the pretrained model's function.
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        *,
        scaling: float = 1.0,
        activation: str = "relu",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck, dtype=dtype)
        self.activation = ACT2FN[activation]
        self.up = nn.Linear(bottleneck, hidden_size, dtype=dtype)
        self.scaling = scaling
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.up(self.activation(self.down(hidden_states)))
        return output if self.scaling == 1 else output * self.scaling
