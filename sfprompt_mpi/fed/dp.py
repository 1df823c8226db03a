"""Client-level differential privacy for the uploaded prompts and tail (DP-FedAvg).

McMahan et al., "Learning differentially private recurrent language models"
(ICLR 2018): each selected client's delta from the global vector is clipped to
L2 norm ``clip``; the server averages the clipped deltas over the K selected
clients (a fixed denominator, so one client's influence is at most clip / K)
and adds Gaussian noise of standard deviation ``noise * clip / K`` to every
coordinate. The privacy spent after r rounds, with clients sampled at rate
q = K / N, is computed by Opacus's RDP accountant (``opacus.accountants``):
the subsampled Gaussian mechanism composed r times.

The noise comes from a generator seeded by (run seed, round), so a run and its
resumed twin add the same noise and end with the same parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .aggregate import clip_delta
from .state import derive_seed

_NOISE_STREAM = 0xD1FF  # derive_seed(seed, round, _NOISE_STREAM): the noise of one round


def dp_fedavg(global_F: torch.Tensor, updates: Sequence[torch.Tensor], *, clip: float, noise: float,
              selected: int, seed: int, rnd: int) -> tuple[torch.Tensor, dict[str, float]]:
    """One DP-FedAvg aggregation; -> (new global vector, scalars worth logging).

    ``updates``: the surviving clients' trained vectors in client-id order;
    ``selected``: K, the number of clients selected this round (the fixed
    denominator: a client that dropped out contributes a zero delta).
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if selected < max(1, len(updates)):
        raise ValueError(f"selected = {selected} is smaller than the {len(updates)} updates")
    base = global_F.to(torch.float64)
    acc = torch.zeros_like(base)
    clipped_count = 0
    for u in updates:
        delta, norm = clip_delta(u.to(torch.float64) - base, clip)
        acc += delta
        clipped_count += norm > clip
    mean = acc / selected
    sigma = noise * clip / selected
    if sigma > 0:
        gen = torch.Generator().manual_seed(derive_seed(seed, rnd, _NOISE_STREAM))
        mean += torch.randn(base.shape, generator=gen, dtype=torch.float64) * sigma
    stats = {"dp_sigma": sigma, "dp_clipped_frac": clipped_count / max(len(updates), 1)}
    return (base + mean).to(torch.float32), stats


def dp_epsilon(rounds: int, *, noise: float, sample_rate: float, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the subsampled Gaussian mechanism.

    Opacus's RDP accountant; infinite without noise. A pure function of its
    arguments, so a resumed run reports the same epsilon as an uninterrupted one.
    """
    if rounds <= 0:
        return 0.0
    if noise <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, rounds)]  # r identical steps, as accountant.step would record
    return float(accountant.get_epsilon(delta=delta))
