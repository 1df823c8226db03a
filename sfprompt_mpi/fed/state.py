"""Trainable state: the parameters an algorithm trains, as one flat vector.

Both ends build the same model from the same config, so a name list fixes the
layout and only the flat float32 vector ``F`` travels.
"""

from __future__ import annotations

import math
import weakref

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
        # Per model: its trained parameters and flat views of them, in layout order. Walking a
        # ViT's modules for its parameters takes about as long as copying them all (0.25 ms on
        # the micro model), which every client paid twice per round.
        self._views: weakref.WeakKeyDictionary[torch.nn.Module, tuple[list[torch.Tensor], list[torch.Tensor]]] = \
            weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:  # the views stay behind: a copy in another process keeps its own
        return {k: v for k, v in self.__dict__.items() if k != "_views"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _views=weakref.WeakKeyDictionary())

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> ``flat_F`` float32 on CPU."""
        return torch.cat([tensors[n].detach().reshape(-1).to("cpu", torch.float32) for n in self.names])

    def flatten_model(self, model: torch.nn.Module) -> torch.Tensor:
        """The model's trained parameters -> ``flat_F`` float32 on CPU, as :meth:`flatten` of :meth:`read`
        gives it, in one copy."""
        return torch.cat(self._flat_views(model)).to("cpu", torch.float32)

    def load(self, model: torch.nn.Module, flat_F: torch.Tensor) -> None:
        """Copy ``flat_F`` into the model's trained parameters (:meth:`write` of :meth:`unflatten`). In place."""
        views = self._flat_views(model)
        if views:
            torch._foreach_copy_(views, flat_F.to(views[0].device).split(self.sizes))

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

    def _flat_views(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """Flat views of the model's trained parameters, in layout order; built again when a
        parameter's memory was replaced (``model.to``, ``param.data = ...``): a view that still
        holds the old memory keeps that address from being reused, so the address tells."""
        found = self._views.get(model)
        if found is not None and all(v.data_ptr() == p.data_ptr() for v, p in zip(*found)):
            return found[0]
        params = dict(model.named_parameters())
        trained = [params[n] for n in self.names]
        views = [p.detach().view(-1) for p in trained]
        self._views[model] = (views, trained)
        return views


def select_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """The K = max(1, round(fraction * N)) clients of round ``rnd``, ascending."""
    k = clients_per_round(num_clients, fraction)
    rng = np.random.default_rng(derive_seed(seed, rnd, 0x5E1EC7))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))
