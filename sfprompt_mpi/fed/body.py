"""What the server does with the activations it receives: the body's forward and backward.

A :class:`FrozenBody` may serve clients in any order and run several
clients' activations through one pass (the mathematics does not change);
a :class:`TrainedBody` (SplitFed) takes an optimiser step per client
mini-batch, so the server serves one client at a time, in client-id order.
An algorithm picks one with :meth:`~sfprompt_mpi.algorithms.base.Algorithm.server_body`.
"""

from __future__ import annotations

import torch

from ..model.split import PromptedViT
from .training import make_optimizer


class FrozenBody:
    """The server's body, frozen; under bfloat16 autocast with ``bf16``."""

    #: The body changes with every batch: the server serves one client at a time, in client-id order,
    #: and keeps every graph for the backward.
    trains = False

    def __init__(self, model: PromptedViT, device: torch.device, *, bf16: bool = False) -> None:
        self.model = model
        self.device = device
        self.bf16 = bf16

    def forward(self, acts_BND: torch.Tensor) -> torch.Tensor:
        """The body's forward. Weights stay float32; with ``bf16`` matrix products run in
        bfloat16 (the inputs' gradient comes back in float32, the leaf's dtype)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model.body(acts_BND)

    def backward(self, out_BND: torch.Tensor, leaf_BND: torch.Tensor, grad_BND: torch.Tensor) -> torch.Tensor:
        """dL/dacts for the clients from dL/dout."""
        (g_BND,) = torch.autograd.grad(out_BND, leaf_BND, grad_BND.to(out_BND.dtype))
        return g_BND


class TrainedBody(FrozenBody):
    """A body the server trains: one optimiser step per client mini-batch, taken after the
    clients' gradient was computed with the old weights."""

    trains = True

    def __init__(self, model: PromptedViT, device: torch.device, *, bf16: bool, params: list[str], cfg) -> None:
        super().__init__(model, device, bf16=bf16)
        named = dict(model.named_parameters())
        self.params = [named[n].requires_grad_(True) for n in params]
        self.optimizer = make_optimizer(self.params, cfg, cfg.fed.lr)

    def backward(self, out_BND, leaf_BND, grad_BND):
        grads = torch.autograd.grad(out_BND, [leaf_BND, *self.params], grad_BND.to(out_BND.dtype))
        for p, g in zip(self.params, grads[1:]):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grads[0]
