"""Trainable state: which parameters each algorithm trains, as one flat vector.

Both ends build the same model from the same config, so a name list fixes the
layout and only the flat float32 vector ``F`` travels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import Config
from ..model.split import PromptedViT
from .algos import algo_of

_CLASSIFIER = "vit.head."  # timm's classifier; fc_norm and the final norm belong to the tail


def derive_seed(base: int, *parts: int) -> int:
    """An independent 63-bit seed for (base, parts...): one base seed feeds everything."""
    return int(np.random.SeedSequence([base, *parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def trainable_names(model: PromptedViT, cfg: Config) -> list[str]:
    """Names of the parameters that clients train and the server aggregates, in model order.

    sfprompt: prompts + tail (+ head with ``model.train_head``); sfl-full: head + tail
    (the server trains the body itself, see :func:`server_trained_names`); fl-full: all;
    *-linear: the classifier; fedpeft-*: prompts, biases or adapters, plus the classifier.
    """
    trains = algo_of(cfg).trains
    all_names = [n for n, _ in model.named_parameters()]
    classifier = {n for n in all_names if n.startswith(_CLASSIFIER)}
    prompts = {n for n in all_names if n.startswith("prompts.")}
    if trains == "prompts+tail":
        parts = ("head", "tail") if cfg.model.train_head else ("tail",)
        names = set(model.names_in(*parts)) | prompts
    elif trains == "all":
        names = set(model.names_in("head", "tail")) if algo_of(cfg).split else set(all_names)
    elif trains == "classifier":
        names = classifier
    elif trains == "prompts+classifier":
        names = prompts | classifier
    elif trains == "bias":
        names = {n for n in all_names if n.endswith(".bias")} | classifier
    elif trains == "adapter":
        names = {n for n in all_names if ".adapter." in n} | classifier
    else:
        raise ValueError(f"unknown training set {trains!r}")
    return [n for n in all_names if n in names]


def server_trained_names(model: PromptedViT, cfg: Config) -> list[str]:
    """Parameters the server itself trains (sfl-full: the body); empty for every other algorithm."""
    return model.names_in("body") if algo_of(cfg).server_trains_body else []


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
