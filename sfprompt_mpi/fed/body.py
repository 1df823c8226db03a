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

    #: The body changes with every batch: the server keeps every graph for the backward.
    trains = False
    #: How the server serves the clients' requests (a :data:`sfprompt_mpi.simclock.POLICIES` name, which
    #: the simulated clock models): 'fifo' batches whatever has arrived, in any order; 'in_turn' one client
    #: at a time in client-id order; 'merge' one pass over every client's activations of a step.
    policy = "fifo"

    def __init__(self, model: PromptedViT, device: torch.device, *, bf16: bool = False) -> None:
        self.model = model
        self.device = device
        self.bf16 = bf16

    def forward(self, acts_BND: torch.Tensor) -> torch.Tensor:
        """The body's forward. Weights stay float32; with ``bf16`` matrix products run in
        bfloat16 (the inputs' gradient comes back in float32, the leaf's dtype)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model.body(acts_BND)

    def backward(self, out_BND: torch.Tensor, leaf_BND: torch.Tensor, grad_BND: torch.Tensor,
                 sizes: list[int]) -> torch.Tensor:
        """dL/dacts for the clients from dL/dout (``sizes``: the batch of each client in the pass)."""
        (g_BND,) = torch.autograd.grad(out_BND, leaf_BND, grad_BND.to(out_BND.dtype))
        return g_BND


class TrainedBody(FrozenBody):
    """A body the server trains: one optimiser step per client mini-batch, taken after the
    clients' gradient was computed with the old weights."""

    trains = True
    policy = "in_turn"

    def __init__(self, model: PromptedViT, device: torch.device, *, bf16: bool, params: list[str], cfg) -> None:
        super().__init__(model, device, bf16=bf16)
        named = dict(model.named_parameters())
        self.params = [named[n].requires_grad_(True) for n in params]
        self.optimizer = make_optimizer(self.params, cfg, cfg.fed.lr)

    def backward(self, out_BND, leaf_BND, grad_BND, sizes):
        grads = torch.autograd.grad(out_BND, [leaf_BND, *self.params], grad_BND.to(out_BND.dtype))
        for p, g in zip(self.params, grads[1:]):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grads[0]


class MergedBody(TrainedBody):
    """Feature merging (MergeSFL): one pass and one optimiser step over every client's activations of a
    step, concatenated along the batch in client order.

    Each client returns the gradient of its own mean loss ``L_i`` over its ``d_i`` samples. The merged
    loss is ``L = sum_i (d_i / D) L_i`` (the mean over all ``D`` samples), so client i's slice is scaled
    by ``d_i / D`` before the body's backward and step; the input gradient dispatched to client i is
    scaled back by ``D / d_i``: the gradient of its own mean loss, through the body before the step.
    """

    policy = "merge"

    def backward(self, out_BND, leaf_BND, grad_BND, sizes):
        share_B = _per_row([d / sum(sizes) for d in sizes], sizes, grad_BND)
        g_BND = super().backward(out_BND, leaf_BND, grad_BND * share_B, sizes)
        return g_BND * _per_row([sum(sizes) / d for d in sizes], sizes, g_BND)


def _per_row(values: list[float], sizes: list[int], like_BND: torch.Tensor) -> torch.Tensor:
    """``values[i]`` for each of the ``sizes[i]`` rows of member i, shaped to broadcast over ``like_BND``."""
    rows_B = torch.repeat_interleave(torch.tensor(values, dtype=like_BND.dtype, device=like_BND.device),
                                     torch.tensor(sizes, device=like_BND.device))
    return rows_B.view(-1, *([1] * (like_BND.dim() - 1)))
