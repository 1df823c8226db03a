"""Aggregation of client updates: pure functions of (state dict, weight) pairs."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def fedavg(updates: Sequence[tuple[StateDict, float]]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts, weights normalised to sum to one.

    Accumulates in float64 in the order given (callers pass client-id order,
    so the result never depends on arrival order) and casts back to each
    tensor's dtype.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(w for _, w in updates))
    if not total > 0:
        raise ValueError(f"fedavg weights must sum to > 0, got {total}")
    names = list(updates[0][0].keys())
    out = {}
    for name in names:
        acc = torch.zeros_like(updates[0][0][name], dtype=torch.float64)
        for state, w in updates:
            acc += state[name].to(torch.float64) * (float(w) / total)
        out[name] = acc.to(updates[0][0][name].dtype)
    return out
