"""Aggregation of client updates: pure functions of (update, weight) pairs.

``fedavg`` works on state dicts; the robust aggregators work on the flat
float32 vectors that travel (``F`` = every trainable parameter, see
:class:`~sfprompt_mpi.fed.state.Layout`).

FedAvg sums exactly (:class:`ExactSum`): a float32 vector times an integer
sample count is an integer multiple of 2^-149, so the weighted sum is kept as
integers and its value never depends on the order of the additions. The
server therefore adds each update as it arrives and holds one accumulator,
not K vectors, and the MPI run still equals the reference run bitwise. The
robust aggregators need every update at once; they accumulate in float64 in
the order given (callers pass client-id order, so the result never depends
on MPI arrival order) and return float32.

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

from typing import Callable, Mapping, Sequence

import torch

from ..config import AGGREGATORS

try:
    from . import _exactsum       # the C loops (setup.py); built wherever a C compiler was found at install
except ImportError:               # pragma: no cover - exercised where the extension is missing
    _exactsum = None

StateDict = Mapping[str, torch.Tensor]
__all__ = ["AGGREGATORS", "ExactSum", "Updates", "aggregate", "all_finite", "clip_delta", "fedavg", "fedavg_flat",
           "median", "norm_clip", "trimmed_mean"]

_LIMB = 32                        # bits per limb; limb j holds the multiples of 2^(32 j - 149)
_MASK = (1 << _LIMB) - 1
_LIMBS = 10                       # 2^-149 .. 2^(320 - 149): every float32 times a weight below 2^31, summed
MAX_WEIGHT = (1 << 31) - 1        # weights (sample counts) are integers in 1..MAX_WEIGHT
_MAX_TERMS = 1 << 29              # each addition adds < 2^33 to a limb: int64 holds 2^29 of them
_CHUNK = 1 << 14                  # values per vectorised piece
_NEXT_3x1 = torch.arange(3).unsqueeze(1)   # a value touches limbs q, q + 1, q + 2


def all_finite(t: torch.Tensor) -> bool:
    """No NaN nor Inf in ``t``: its largest and smallest values are finite (both
    propagate NaN). Two reductions, 10x faster than ``isfinite(t).all()``, which
    writes a mask first: it runs on every payload the server receives."""
    return t.numel() == 0 or bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin()))  # one sync on a GPU


class ExactSum:
    """Exact sum of ``weight * x`` over float32 vectors ``x`` and integer weights.

    Each float32 value is ``±M * 2^s * 2^-149`` with an integer ``M < 2^24``
    and ``0 <= s <= 253`` (read from its bits; subnormals included), so
    ``weight * x`` is an integer multiple of 2^-149 below 2^308. Ten int64
    limbs of 32 bits hold such sums with room for 2^29 additions; integer
    addition is associative, so the limbs, and :meth:`mean`, are the same for
    any order of :meth:`add` calls. Memory: 80 bytes per coordinate.

    :meth:`add` and :meth:`total` run the C loops of ``_exactsum.c`` (without
    the GIL) where it was built, else torch (:func:`_add_chunk`): the same limbs
    and the same total either way (``use_c`` picks one; the tests compare them).
    """

    def __init__(self, numel: int, use_c: bool = True) -> None:
        self.numel = numel
        self.limbs_LF = torch.zeros(_LIMBS, numel, dtype=torch.int64)
        self._c = _exactsum if use_c else None
        self.weight = 0
        self.terms = 0

    def add(self, x_F: torch.Tensor, weight: int) -> None:
        """Add ``weight * x_F`` (``x_F``: finite float32, ``numel`` values; ``weight``: integer >= 1)."""
        if x_F.dtype != torch.float32 or x_F.numel() != self.numel:
            raise ValueError(f"expected {self.numel} float32 values, got {x_F.numel()} {x_F.dtype}")
        if int(weight) != weight or not 1 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be an integer in 1..{MAX_WEIGHT}, got {weight}")
        if self.terms >= _MAX_TERMS:
            raise ValueError(f"ExactSum holds at most {_MAX_TERMS} terms")
        if not all_finite(x_F):
            raise ValueError("cannot sum NaN or Inf")
        x_F = x_F.detach().reshape(-1).cpu().contiguous()
        if self._c is not None:
            self._c.add(self.limbs_LF.data_ptr(), x_F.data_ptr(), self.numel, self.numel, int(weight))
        else:
            for start in range(0, self.numel, _CHUNK):   # cache-sized pieces: 8x faster than whole vectors
                _add_chunk(self.limbs_LF[:, start:start + _CHUNK], x_F[start:start + _CHUNK], int(weight))
        self.weight += int(weight)
        self.terms += 1

    def total(self) -> torch.Tensor:
        """The sum, rounded to float64 (a function of the exact sum alone)."""
        out_F = torch.empty(self.numel, dtype=torch.float64)
        if self._c is not None:
            self._c.total(self.limbs_LF.data_ptr(), out_F.data_ptr(), self.numel, self.numel, _LIMBS)
            return out_F
        for start in range(0, self.numel, _CHUNK):
            limbs = self.limbs_LF[:, start:start + _CHUNK].clone()
            for j in range(_LIMBS - 1):                # carries: limbs 0..8 in [0, 2^32), the top one signed
                carry = limbs[j] >> _LIMB
                limbs[j] -= carry << _LIMB
                limbs[j + 1] += carry
            acc = limbs[-1].to(torch.float64)
            for j in range(_LIMBS - 2, -1, -1):
                acc = acc * float(1 << _LIMB) + limbs[j].to(torch.float64)
            out_F[start:start + _CHUNK] = acc * 2.0 ** -149
        return out_F

    def mean(self) -> torch.Tensor:
        """Sum / total weight, as float32."""
        if not self.terms:
            raise ValueError("mean of no updates")
        return (self.total() / self.weight).to(torch.float32)


def _add_chunk(limbs_LC: torch.Tensor, x_C: torch.Tensor, weight: int) -> None:
    """limbs += weight * x for one chunk (see :class:`ExactSum`); exact for negative values too:
    ``v = lo + hi 2^32`` with ``lo`` in [0, 2^32) and ``hi`` rounded down, and likewise after the shift."""
    bits_C = x_C.view(torch.int32).to(torch.int64)
    biased_C = (bits_C >> 23) & 0xFF
    v_C = ((bits_C & 0x7FFFFF) | ((biased_C > 0).to(torch.int64) << 23)) * weight   # M w < 2^55
    v_C = torch.where(bits_C < 0, -v_C, v_C)
    shift_C = (biased_C - 1).clamp_(min=0)                  # x = ±M 2^shift 2^-149, shift in 0..253
    r_C = shift_C & (_LIMB - 1)
    lo_C = (v_C & _MASK) << r_C                             # in [0, 2^63)
    hi_C = (v_C >> _LIMB) << r_C                            # |.| < 2^55
    parts_3C = torch.stack([lo_C & _MASK, (lo_C >> _LIMB) + (hi_C & _MASK), hi_C >> _LIMB])
    limbs_LC.scatter_add_(0, (shift_C >> 5) + _NEXT_3x1, parts_3C)   # q = shift // 32


def fedavg(updates: Sequence[tuple[StateDict, float]]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts by integer weights (sample counts), summed exactly.

    The result does not depend on the order of ``updates``. Tensors of at
    most 32-bit floats; each comes back in its own dtype.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    out = {}
    for name, first in updates[0][0].items():
        if first.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"fedavg sums float32, float16 and bfloat16 tensors exactly; {name} is {first.dtype}")
        acc = ExactSum(first.numel())
        for state, w in updates:
            acc.add(state[name].reshape(-1).to(torch.float32), w)
        out[name] = acc.mean().reshape(first.shape).to(first.dtype)
    return out


def fedavg_flat(updates: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Weighted mean of flat vectors: bitwise what :func:`fedavg` gives tensor by tensor."""
    return fedavg([({"F": u}, w) for u, w in updates])["F"]


class Updates:
    """One round attempt's client updates, taken as they arrive.

    For FedAvg (``streaming``) each vector goes into an :class:`ExactSum` on
    arrival and is dropped: the server holds one accumulator whatever K is.
    The other aggregators and DP-FedAvg keep every vector until the end.
    """

    def __init__(self, numel: int, streaming: bool,
                 index: Callable[[int], torch.Tensor | None] | None = None) -> None:
        self.numel = numel
        self.counts: dict[int, int] = {}                # client id -> sample count
        self.vectors: dict[int, torch.Tensor] = {}      # kept only when not streaming
        self.sum = ExactSum(numel) if streaming else None
        #: client id -> the positions it holds (None: all); its update carries just those values
        self.index = index
        #: per position, the summed sample counts of the clients holding it (when some hold a part)
        self.cover_F: torch.Tensor | None = None

    def add(self, cid: int, x_F: torch.Tensor, count: int) -> None:
        """Take client ``cid``'s update (only its positions, when ``index`` says it holds a part)."""
        idx = self.index(cid) if self.index is not None else None
        if idx is not None:
            full_F = torch.zeros(self.numel, dtype=torch.float32)
            full_F[idx] = x_F.reshape(-1).to(torch.float32)
            x_F = full_F
        if self.index is not None:
            if self.cover_F is None:
                self.cover_F = torch.zeros(self.numel, dtype=torch.int64)
            self.cover_F[slice(None) if idx is None else idx] += int(count)
        if self.sum is not None:
            self.sum.add(x_F, count)
        else:
            self.vectors[cid] = x_F
        self.counts[cid] = int(count)

    def __len__(self) -> int:
        return len(self.counts)

    def mean(self, global_F: torch.Tensor) -> torch.Tensor:
        """The exact FedAvg: each position's weighted mean over the clients that hold it (all of them
        unless ``index`` says otherwise); a position no client holds keeps ``global_F``'s value."""
        acc = self.sum
        if acc is None:
            acc = ExactSum(self.numel)
            for x_F, w in self.in_order():
                acc.add(x_F, w)
        if self.cover_F is None:
            return acc.mean()
        held_F = self.cover_F > 0
        total_F = acc.total()
        out_F = global_F.detach().to("cpu", torch.float64).clone()
        out_F[held_F] = total_F[held_F] / self.cover_F[held_F].to(torch.float64)
        return out_F.to(torch.float32)

    def ids(self) -> list[int]:
        """Client ids that sent an update, ascending."""
        return sorted(self.counts)

    def in_order(self) -> list[tuple[torch.Tensor, int]]:
        """(vector, count) pairs in client-id order (only when not streaming)."""
        if self.sum is not None:
            raise ValueError("a streaming FedAvg keeps no vectors")
        return [(self.vectors[c], self.counts[c]) for c in self.ids()]


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
