"""Bottleneck adapters (FedPEFT's ``adapter`` variant): one after each block's MLP.

``mlp(x) -> mlp(x) + up(gelu(down(mlp(x))))`` with ``up`` initialised to
zero, so a model with fresh adapters computes exactly what the backbone
does. The adapter hangs off the block as ``adapter`` and is applied by a
forward hook on ``block.mlp``, so timm's own parameter names (and pretrained
weight loading) are untouched: ``vit.blocks.3.adapter.down.weight`` is new,
``vit.blocks.3.mlp.fc1.weight`` is what it always was.
"""

from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """``x_BND -> x_BND + up(gelu(down(x_BND)))``, a D -> r -> D bottleneck."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return x_BND + self.up(self.act(self.down(x_BND)))

    def after_mlp(self, module: nn.Module, inputs: tuple, out_BND: torch.Tensor) -> torch.Tensor:
        """Forward hook on the block's MLP (a bound method, so deep copies hook their own adapter)."""
        return self(out_BND)


def add_adapters(vit: nn.Module, bottleneck: int) -> None:
    """Give every block of a timm VisionTransformer an adapter after its MLP. In place."""
    for block in vit.blocks:
        block.adapter = Adapter(vit.embed_dim, bottleneck)
        block.mlp.register_forward_hook(block.adapter.after_mlp)
