"""Our aggregators against Flower's definitions of the same three (issue: speed against the peers).

Flower is not a dependency (its simulation extra pulls in Ray), so the oracle
is Flower's code written down here: ``aggregate``, ``aggregate_median`` and
``aggregate_trimmed_avg`` / ``_trim_mean`` of
``framework/py/flwr/server/strategy/aggregate.py`` in adap/flower at commit
fdef7afb1dca3030553be302366cfd285ed6632c (Flower 1.42; the functions that
FedAvg, FedMedian and FedTrimmedAvg call), on NumPy float32 arrays as
Flower's clients send them.

Where the definitions match and where they differ:

- weighted mean: the same definition, sum of count x update over the total
  count. Flower computes it in float32 (each product rounded, then the sum);
  ours is the exact sum rounded once, so it is at least as close to the true
  mean. On values whose products and sums float32 holds exactly they agree bit
  for bit; otherwise within a few float32 ulps, ours never the farther.
- median: the same definition (unweighted, mean of the two middle values for
  an even count), bit for bit: halving commutes with rounding.
- trimmed mean: the same cut, ``int(fraction * K)`` values off each end, and
  the unweighted mean of the rest. Flower sums in float32, ours in float64:
  equal on exactly representable sums, within a few ulps otherwise.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import pytest
import torch

from sfprompt_mpi.fed.aggregate import aggregate


# ---------------------------------------------------------------- Flower's definitions, transcribed

def flower_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    num_examples_total = sum(num_examples for (_, num_examples) in results)
    weighted_weights = [[layer * num_examples for layer in weights] for weights, num_examples in results]
    return [reduce(np.add, layer_updates) / num_examples_total for layer_updates in zip(*weighted_weights)]


def flower_median(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    weights = [weights for weights, _ in results]
    return [np.median(np.asarray(layer), axis=0) for layer in zip(*weights)]


def _trim_mean(array: np.ndarray, proportiontocut: float) -> np.ndarray:
    nobs = array.shape[0]
    lowercut = int(proportiontocut * nobs)
    uppercut = nobs - lowercut
    atmp = np.partition(array, (lowercut, uppercut - 1), 0)
    return np.mean(atmp[lowercut:uppercut], axis=0)


def flower_trimmed_avg(results: list[tuple[list[np.ndarray], int]], proportiontocut: float) -> list[np.ndarray]:
    weights = [weights for weights, _ in results]
    return [_trim_mean(np.asarray(layer), proportiontocut=proportiontocut) for layer in zip(*weights)]


# ------------------------------------------------------------------------------------------ tests

def _ours(name: str, updates: list[np.ndarray], counts: list[int], trim: float = 0.25) -> np.ndarray:
    pairs = [(torch.from_numpy(u), c) for u, c in zip(updates, counts)]
    out, _ = aggregate(name, torch.zeros(len(updates[0])), pairs, trim=trim)
    return out.numpy()


def _theirs(name: str, updates: list[np.ndarray], counts: list[int], trim: float = 0.25) -> np.ndarray:
    results = [([u], c) for u, c in zip(updates, counts)]
    if name == "fedavg":
        return flower_aggregate(results)[0]
    if name == "median":
        return flower_median(results)[0]
    return flower_trimmed_avg(results, trim)[0]


@pytest.mark.parametrize("name", ["fedavg", "median", "trimmed-mean"])
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_same_bits_as_flower_where_float32_holds_every_step(name, k):
    rng = np.random.default_rng(k)
    updates = [(rng.integers(-64, 64, size=300) / 8).astype(np.float32) for _ in range(k)]
    counts = [1, 2, 4, 8, 16, 32, 64, 128][:k]  # the weighted sums stay exact in float32

    assert np.array_equal(_ours(name, updates, counts), _theirs(name, updates, counts).astype(np.float32))


@pytest.mark.parametrize("k", [3, 4, 7, 10])
def test_on_real_updates_median_is_bitwise_and_the_means_within_float32_rounding(k):
    rng = np.random.default_rng(100 + k)
    updates = [(rng.standard_normal(2000) * 10.0 ** rng.integers(-4, 2)).astype(np.float32) for _ in range(k)]
    counts = [int(c) for c in rng.integers(1, 600, size=k)]
    exact = sum(u.astype(np.float64) * c for u, c in zip(updates, counts)) / sum(counts)

    assert np.array_equal(_ours("median", updates, counts), _theirs("median", updates, counts))
    for name in ("fedavg", "trimmed-mean"):
        ours, theirs = _ours(name, updates, counts), _theirs(name, updates, counts)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    # ours rounds the exact weighted mean once: never farther from it than Flower's float32 sum
    ours, theirs = _ours("fedavg", updates, counts), _theirs("fedavg", updates, counts)
    assert np.all(np.abs(ours - exact) <= np.abs(theirs.astype(np.float64) - exact))


@pytest.mark.parametrize("k, fraction", [(4, 0.25), (5, 0.25), (10, 0.1), (10, 0.45), (3, 0.2)])
def test_trimmed_mean_cuts_as_many_values_as_flower(k, fraction):
    # updates k, k-1, ...: which values are cut decides the mean exactly
    updates = [np.full(3, float(i), dtype=np.float32) for i in range(k)]

    assert np.array_equal(_ours("trimmed-mean", updates, [1] * k, fraction),
                          _theirs("trimmed-mean", updates, [1] * k, fraction).astype(np.float32))
