"""Splitting a training set over federated clients.

Every function here is a pure function of (labels, number of clients, seed):
no torch, no files, no global RNG. The same call on every rank therefore
yields the same partition, so a rank can compute its own clients' shards
without any communication, and the single-process reference run sees
exactly the data the MPI run sees.

Schemes:

- ``iid``: a seeded shuffle cut into near-equal parts.
- ``dirichlet``: label skew after Hsu et al. (2019): for every class, its
  samples are divided among clients in proportions drawn from
  Dirichlet(alpha); smaller alpha gives more skew.
- ``shards``: label-sorted shards dealt at random (McMahan et al., 2017);
  each client sees only a few labels.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

SCHEMES = ("iid", "dirichlet", "shards")

# Independent RNG streams for the steps of one partition, so that changing
# one step (e.g. the rebalancing) never shifts the draws of another.
_STREAM_SHUFFLE, _STREAM_DIRICHLET, _STREAM_REBALANCE, _STREAM_DEAL = range(4)


def partition_indices(labels: np.ndarray, num_clients: int, scheme: str, *,
                      alpha: float = 0.5, shards_per_client: int = 2,
                      seed: int = 0) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` over ``num_clients`` clients.

    Returns one int64 array per client, sorted ascending; together they hold
    every index exactly once and every client holds at least one. The result
    depends only on the arguments.

    Raises :class:`UserError` for an unknown scheme, a non-positive client
    count, more clients than samples, or (``shards``) more shards than samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"partition needs a 1-D label array, got shape {labels.shape}")
    n = len(labels)
    if num_clients < 1:
        raise UserError(f"number of clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise UserError(f"{num_clients} clients but only {n} training samples; "
                        "lower --clients or raise --max-train-samples")
    if scheme == "iid":
        parts = _iid(n, num_clients, seed)
    elif scheme == "dirichlet":
        if not (alpha > 0 and np.isfinite(alpha)):
            raise UserError(f"data.alpha must be > 0, got {alpha}")
        parts = _dirichlet(labels, num_clients, alpha, seed)
    elif scheme == "shards":
        parts = _shards(labels, num_clients, shards_per_client, seed)
    else:
        raise UserError(f"unknown partition scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution
    and the global one: 0 for perfectly iid clients, near 1 when every client
    holds a single rare label. Clients count equally, whatever their size."""
    labels = np.asarray(labels)
    classes, codes = np.unique(labels, return_inverse=True)
    k = len(classes)
    global_dist = np.bincount(codes, minlength=k) / len(codes)
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        local = np.bincount(codes[np.asarray(part)], minlength=k) / len(part)
        distances.append(0.5 * np.abs(local - global_dist).sum())
    return float(np.mean(distances)) if distances else 0.0


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    order = _rng(seed, _STREAM_SHUFFLE).permutation(n)
    return np.array_split(order, num_clients)


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    shuffle_rng = _rng(seed, _STREAM_SHUFFLE)
    draw_rng = _rng(seed, _STREAM_DIRICHLET)
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = shuffle_rng.permutation(np.flatnonzero(labels == cls))
        share = draw_rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(share)):
            # numpy's sampler underflows only for absurdly small alpha; a
            # uniform share keeps the partition valid rather than crashing.
            share = np.full(num_clients, 1.0 / num_clients)
        cuts = (np.cumsum(share) * len(members)).astype(np.int64)[:-1]
        for client, chunk in enumerate(np.split(members, cuts)):
            buckets[client].append(chunk)
    parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
    return _fill_empty(parts, seed)


def _fill_empty(parts: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Give every empty client one sample taken from the currently largest
    client. A re-draw could loop for a long time at small alpha and would
    change the skew; moving single samples barely changes it and always ends."""
    rng = _rng(seed, _STREAM_REBALANCE)
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for client in range(len(parts)):
        if len(parts[client]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))  # first largest: deterministic
            pick = int(rng.integers(len(parts[donor])))
            parts[client] = parts[donor][pick:pick + 1]
            parts[donor] = np.delete(parts[donor], pick)
    return parts


def _shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    if shards_per_client < 1:
        raise UserError(f"data.shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise UserError(f"shards partition needs at least clients*shards_per_client = {num_shards} "
                        f"samples, have {len(labels)}; lower --shards-per-client or --clients")
    # Shuffle before the stable sort so that, within a class, which samples
    # share a shard depends on the seed rather than on file order.
    shuffled = _rng(seed, _STREAM_SHUFFLE).permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = _rng(seed, _STREAM_DEAL).permutation(num_shards)
    return [np.concatenate([shards[s] for s in dealt[c * shards_per_client:(c + 1) * shards_per_client]])
            for c in range(num_clients)]
