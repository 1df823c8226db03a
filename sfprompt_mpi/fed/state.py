"""Trainable state: the parameters an algorithm trains, as one flat vector.

Both ends build the same model from the same config, so a name list fixes the
layout and only the flat float32 vector ``F`` travels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import clients_per_round



def derive_seed(base: int, *parts: int) -> int:
    """An independent 63-bit seed for (base, parts...): one base seed feeds everything."""
    return int(np.random.SeedSequence([base, *parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class Layout:
    """Name -> slice of a flat float32 vector."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        params = dict(model.named_parameters())
        self.names = list(names)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> ``flat_F`` float32 on CPU."""
        return torch.cat([tensors[n].detach().reshape(-1).to("cpu", torch.float32) for n in self.names])

    def flatten_model(self, model: torch.nn.Module) -> torch.Tensor:
        """The model's trained parameters -> ``flat_F`` float32 on CPU: :meth:`flatten` of :meth:`read`,
        copied once instead of twice."""
        return self.flatten(dict(model.named_parameters()))

    def unflatten(self, flat_F: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(flat_F, self.sizes)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def read(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def write(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the model's parameters. In place."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(tensors[n])


def select_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """The K = max(1, round(fraction * N)) clients of round ``rnd``, ascending."""
    k = clients_per_round(num_clients, fraction)
    rng = np.random.default_rng(derive_seed(seed, rnd, 0x5E1EC7))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))
