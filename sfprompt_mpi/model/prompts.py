"""Soft prompt tokens, inserted after the class token (VPT style).

Shallow prompts are one set of P tokens added at the input of the first head
block. Deep prompts are one set per head block: before block i > 0 the prompt
positions are overwritten with that block's own tokens. Either way the prompt
tokens then travel through body and tail like any other token.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SoftPrompts(nn.Module):
    """``tokens_LPD``: L prompt sets (1 shallow, head blocks deep) of P tokens of width D."""

    def __init__(self, num_tokens: int, dim: int, layers: int, patch_pixels: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        # VPT's uniform init: the fan of a patch embedding plus the token width.
        bound = math.sqrt(6.0 / float(3 * patch_pixels + dim))
        self.tokens = nn.Parameter(torch.empty(layers, num_tokens, dim).uniform_(-bound, bound))

    @property
    def layers(self) -> int:
        return self.tokens.shape[0]

    def insert(self, x_BND: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """Insert layer-0 prompts after the ``num_prefix`` prefix tokens: N -> N + P."""
        p_BPD = self.tokens[0].unsqueeze(0).expand(x_BND.shape[0], -1, -1).to(x_BND.dtype)
        return torch.cat([x_BND[:, :num_prefix], p_BPD, x_BND[:, num_prefix:]], dim=1)

    def replace(self, x_BND: torch.Tensor, num_prefix: int, layer: int) -> torch.Tensor:
        """Overwrite the prompt positions with layer ``layer``'s tokens (deep prompts)."""
        p_BPD = self.tokens[layer].unsqueeze(0).expand(x_BND.shape[0], -1, -1).to(x_BND.dtype)
        end = num_prefix + self.num_tokens
        return torch.cat([x_BND[:, :num_prefix], p_BPD, x_BND[:, end:]], dim=1)
