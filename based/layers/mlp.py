"""SwiGLU MLP (Shazeer, 2020), in every layer of BASED and Transformer++."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.swiglu import swiglu


class SwiGLU(nn.Module):
    """y = fc2(up * silu(gate)), [up, gate] = fc1(x).

    fc1 holds up then gate in one matrix, the layout of the reference (flash-attn GatedMlp), so its
    mlp.fc1 / mlp.fc2 weights load unchanged.

    Args:
        d_model: input and output size.
        hidden_size: inner size (default 2 * d_model, as in BASED).
        bias: biases on fc1 and fc2.
    """

    def __init__(self, d_model: int, hidden_size: int | None = None, bias: bool = False):
        super().__init__()
        hidden_size = 2 * d_model if hidden_size is None else hidden_size
        if d_model <= 0 or hidden_size <= 0:
            raise ValueError(f"SwiGLU sizes must be positive, got d_model={d_model}, hidden_size={hidden_size}")
        self.hidden_size = hidden_size
        self.fc1 = nn.Linear(d_model, 2 * hidden_size, bias=bias)
        self.fc2 = nn.Linear(hidden_size, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(swiglu(up, gate))
