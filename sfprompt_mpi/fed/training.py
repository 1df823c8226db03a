"""Local training on one client: batches of its shard, the optimiser, one loop for every phase.

The same loop trains SFPrompt's local-loss phase (head straight into tail),
split training (head, the server's body as an autograd function, tail) and
whole-model training: only the ``forward`` differs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..config import Config


def take_batch(dataset: Dataset, idx: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of ``idx`` (fast path for in-memory tensor datasets)."""
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors[0], dataset.tensors[1]
        return images[idx_t], labels[idx_t].long()
    items = [dataset[int(i)] for i in idx_t]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.long)


def iter_batches(n: int, batch_size: int, generator: torch.Generator | None):
    """Positions 0..n-1 in batches, shuffled by ``generator`` (None: in order)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config, lr: float) -> torch.optim.Optimizer:
    """The configured optimiser (``fed.optimizer``) over ``params`` at learning rate ``lr``."""
    fed = cfg.fed
    # fused: one call per step that updates each tensor in a single pass (CPU and CUDA), instead of
    # a pass per operation over all tensors (foreach) or per tensor and operation (PyTorch's CPU
    # default). An Adam step of the micro ViT takes 1.8-2.3 instead of 4.2-6.1 ms, 7-10% of a
    # training step; its last bits differ from the foreach step's, the same on every rank
    # (docs/benchmarks.md, issue 20).
    if fed.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=fed.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=fed.momentum, weight_decay=fed.weight_decay, fused=True)


def renew_optimizer(opt: torch.optim.Optimizer) -> None:
    """Put ``opt`` back in the state of a new optimiser over the same parameters.

    Adam's moments and step counts are zeroed in place, which is all a new Adam
    holds before its first step, so the steps after are bitwise a new one's; a
    new Adam would allocate them again (3 tensors per parameter: 2.5 ms per
    client round on the micro ViT, as long as the round's own Adam steps). Any
    other optimiser's state is dropped: SGD's momentum starts from the first
    gradient, not from a zero buffer.
    """
    if isinstance(opt, torch.optim.Adam):
        held = [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        if held:
            torch._foreach_zero_(held)
    else:
        opt.state.clear()


class LocalTrainer:
    """Trains the ``trainable`` parameters of ``model`` on samples of ``dataset``."""

    def __init__(self, cfg: Config, model: torch.nn.Module, trainable: list[torch.nn.Parameter],
                 dataset: Dataset, device: torch.device) -> None:
        self.cfg = cfg
        self.model = model
        self.trainable = trainable
        self.dataset = dataset
        self.device = device
        self._opt: torch.optim.Optimizer | None = None  # renewed at each use (see optimizer)

    def batches(self, indices: np.ndarray, generator: torch.Generator | None,
                batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of ``indices`` in batches, shuffled by ``generator`` (None: in order)."""
        for pos in iter_batches(len(indices), batch_size, generator):
            images, labels = take_batch(self.dataset, indices[pos.numpy()])
            yield images.to(self.device), labels.to(self.device)

    def train(self, forward: Callable[[torch.Tensor], torch.Tensor], indices: np.ndarray,
              generator: torch.Generator, *, epochs: int, lr: float, batch_size: int) -> tuple[float, float]:
        """``epochs`` epochs of cross-entropy on ``forward(images)``; -> (mean loss, accuracy)."""
        opt = self.optimizer(lr)
        if not self.model.training:  # the code sets modes on whole models only; setting them again walks
            self.model.train()       # every module (1.5 ms per client round on the micro ViT)
        total, correct, seen = 0.0, 0, 0
        for _ in range(epochs):
            for images, labels in self.batches(indices, generator, batch_size):
                logits_BK = forward(images)
                loss = F.cross_entropy(logits_BK, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(labels)
                correct += int((logits_BK.argmax(-1) == labels).sum())
                seen += len(labels)
        return total / max(seen, 1), correct / max(seen, 1)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """A new optimiser over the trainable parameters at ``lr``, as :func:`make_optimizer` makes
        it: the one made before, renewed (:func:`renew_optimizer`) and set to ``lr``."""
        if self._opt is None:
            self._opt = make_optimizer(self.trainable, self.cfg, lr)
            return self._opt
        renew_optimizer(self._opt)
        for group in self._opt.param_groups:
            group["lr"] = lr
        return self._opt
