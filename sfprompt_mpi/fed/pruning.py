"""EL2N dataset pruning: keep the samples the current model finds hardest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def el2n_scores(logits_BK: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """``||softmax(logits) - onehot(label)||_2`` per sample -> ``scores_B``."""
    probs_BK = logits_BK.float().softmax(dim=-1)
    onehot_BK = F.one_hot(labels_B, num_classes=logits_BK.shape[-1]).to(probs_BK.dtype)
    return torch.linalg.vector_norm(probs_BK - onehot_BK, dim=-1)


def keep_count(n: int, keep_ratio: float) -> int:
    """ceil(keep_ratio * n), immune to float noise (0.3 * 10 is 3, not 4); at least 1 if n > 0."""
    if n == 0:
        return 0
    return max(1, min(n, math.ceil(round(keep_ratio * n, 9))))


def select_highest(scores_B: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Positions of the ceil(keep_ratio * n) highest scores, ascending; ties go to the lower position."""
    n = scores_B.shape[0]
    k = keep_count(n, keep_ratio)
    order = torch.sort(-scores_B.double(), stable=True).indices  # stable: ties keep position order
    return torch.sort(order[:k]).values
