"""Aggregation of client updates: pure functions of (update, weight) pairs.

``fedavg`` works on state dicts; the robust aggregators work on the flat
float32 vectors that travel (``F`` = every trainable parameter, see
:class:`~sfprompt_mpi.fed.state.Layout`). All of them accumulate in float64 in
the order given (callers pass client-id order, so the result never depends on
MPI arrival order) and return float32.

What one client can do to the global vector, per aggregator (K clients):

- ``fedavg``: anything; its weight times its update moves the mean.
- ``median``: coordinate-wise median; one client of K >= 3 can only shift
  each coordinate to a neighbouring honest value.
- ``trimmed-mean``: coordinate-wise, drops the ``floor(trim * K)`` largest
  and smallest values before averaging (with ``trim * K < 1`` it is the plain
  unweighted mean).
- ``norm-clip``: each client's delta from the global vector is scaled down to
  L2 norm at most ``bound`` before the weighted mean, so one client moves the
  global vector by at most ``weight * bound``. ``bound <= 0`` means the median
  of this round's delta norms.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..config import AGGREGATORS

StateDict = Mapping[str, torch.Tensor]
__all__ = ["AGGREGATORS", "aggregate", "clip_delta", "fedavg", "fedavg_flat", "median", "norm_clip", "trimmed_mean"]


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


def fedavg_flat(updates: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Weighted mean of flat vectors: bitwise what :func:`fedavg` gives tensor by tensor."""
    return fedavg([({"F": u}, w) for u, w in updates])["F"]


def median(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    return _median64(_stack(vectors)).to(torch.float32)


def trimmed_mean(vectors: Sequence[torch.Tensor], trim: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``floor(trim * K)`` largest and smallest values."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    stacked_KF = _stack(vectors)
    k = stacked_KF.shape[0]
    cut = int(trim * k)
    kept_KF = stacked_KF.sort(dim=0).values[cut:k - cut]
    return kept_KF.mean(dim=0).to(torch.float32)


def clip_delta(delta_F: torch.Tensor, bound: float) -> tuple[torch.Tensor, float]:
    """``delta_F`` scaled to L2 norm at most ``bound`` (float64); -> (clipped, original norm)."""
    delta = delta_F.to(torch.float64)
    norm = float(torch.linalg.vector_norm(delta))
    if norm > bound:
        delta = delta * (bound / norm)
    return delta, norm


def norm_clip(global_F: torch.Tensor, updates: Sequence[tuple[torch.Tensor, float]],
              bound: float = 0.0) -> tuple[torch.Tensor, float]:
    """Global vector plus the weighted mean of the clients' deltas, each clipped to ``bound``.

    ``bound <= 0``: the median of the deltas' L2 norms this round (a client
    can then never move the mean by more than a typical client does).
    -> (new global vector, bound used).
    """
    if not updates:
        raise ValueError("norm_clip needs at least one update")
    base = global_F.to(torch.float64)
    deltas = [u.to(torch.float64) - base for u, _ in updates]
    if bound <= 0:
        norms_K = torch.stack([torch.linalg.vector_norm(d) for d in deltas])
        bound = float(_median64(norms_K))
        bound = bound if bound > 0 else float("inf")  # every delta is zero: nothing to clip
    total = float(sum(w for _, w in updates))
    if not total > 0:
        raise ValueError(f"norm_clip weights must sum to > 0, got {total}")
    acc = torch.zeros_like(base)
    for delta, (_, w) in zip(deltas, updates):
        clipped, _ = clip_delta(delta, bound)
        acc += clipped * (float(w) / total)
    return (base + acc).to(torch.float32), bound


def aggregate(name: str, global_F: torch.Tensor, updates: Sequence[tuple[torch.Tensor, float]], *,
              trim: float = 0.25, clip: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The ``--aggregator`` ``name`` over (flat update, sample count) pairs in client-id order.

    -> (new global vector, scalars worth logging, e.g. the clip bound used).
    Sample counts weigh ``fedavg`` and ``norm-clip``; ``median`` and
    ``trimmed-mean`` are unweighted (a weight is exactly what a liar inflates).
    """
    if not updates:
        raise ValueError("aggregate needs at least one update")
    if name == "fedavg":
        return fedavg_flat(updates), {}
    if name == "median":
        return median([u for u, _ in updates]), {}
    if name == "trimmed-mean":
        return trimmed_mean([u for u, _ in updates], trim), {}
    if name == "norm-clip":
        out, bound = norm_clip(global_F, updates, clip)
        return out, {"clip_bound": bound}
    raise ValueError(f"unknown aggregator {name!r} (known: {', '.join(AGGREGATORS)})")


def _median64(stacked_K: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 in float64, averaging the two middle values for an even count."""
    k = stacked_K.shape[0]
    sorted_K = stacked_K.to(torch.float64).sort(dim=0).values
    return sorted_K[(k - 1) // 2] if k % 2 else (sorted_K[k // 2 - 1] + sorted_K[k // 2]) / 2


def _stack(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not vectors:
        raise ValueError("need at least one update")
    return torch.stack([v.to(torch.float64) for v in vectors])
