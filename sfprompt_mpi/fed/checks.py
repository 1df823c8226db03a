"""What the server accepts from a client during a round attempt: one pure check per message.

:func:`check_message` reads the message and the attempt's state and says
what the message is (its kind), or why it is refused: :class:`Late` for a
straggler's message of an earlier round or attempt, or of a client that
already left (discarded without penalty), ProtocolError for anything
malformed (the client leaves the round). It changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..comm.protocol import Kind, Message, ProtocolError, expect
from .aggregate import MAX_WEIGHT, all_finite
from .mailbox import attempt_of


class Late(ProtocolError):
    """A message from an earlier round or attempt, or from a client that already left: discarded, no penalty."""


@dataclass(frozen=True)
class Expected:
    """What one round attempt accepts: its (round, attempt), who may send, and message sizes."""

    round: int
    attempt: int
    host_of: Mapping[int, int]          # client id -> the rank hosting it
    chosen: frozenset[int]              # clients selected for this attempt
    numel: int                          # F, the trainable vector's length
    tokens: int                         # N of the activations
    width: int                          # D of the activations
    batch_size: Callable[[int], int]    # client id -> its largest batch this round
    wire: torch.dtype                   # activations and gradients on the wire
    held: Callable[[int], int] | None = None   # client id -> length of its update, when not all of F


def check_message(msg: Message, want: Expected, active: set[int],
                  awaiting: Callable[[int, int], tuple[int, ...] | None]) -> Kind:
    """Validate a client message; -> its kind.

    ``active``: the clients still in the attempt; ``awaiting(client, step)``:
    the shape of the activations whose body output awaits this gradient, or
    None. Checks kind, round and attempt, client/rank pairing, shape (a batch
    of at most the client's batch size, or exactly the trainable vector),
    dtype, the gradient's match with the activations it answers, and
    finiteness.
    """
    h = msg.header
    if h.kind not in (Kind.ACTS, Kind.GRAD_OUT, Kind.UPDATE):
        raise ProtocolError(f"unexpected message kind {h.kind.label}")
    rnd, attempt = attempt_of(h)
    if (rnd, attempt) != (want.round, want.attempt):
        if (rnd, attempt) < (want.round, want.attempt):
            raise Late(f"late message of round {rnd}" + (f" attempt {attempt}" if attempt else ""))
        raise ProtocolError(f"message for round {rnd} during round {want.round}")
    if want.host_of.get(h.client) != msg.source:
        raise ProtocolError(f"client {h.client} is not a client of rank {msg.source}")
    if h.client not in active:
        if h.client in want.chosen:
            raise Late(f"client {h.client} already left round {want.round}")
        raise ProtocolError(f"client {h.client} is not selected in round {want.round}")
    if h.kind == Kind.UPDATE:
        expect(h, Kind.UPDATE, shape=(want.numel if want.held is None else want.held(h.client),), dtype=torch.float32)
        if not 1 <= h.aux <= MAX_WEIGHT:
            raise ProtocolError(f"update with sample count {h.aux} (must be 1..{MAX_WEIGHT})")
    else:
        _check_activations(msg, want, awaiting)
    if not all_finite(msg.payload):
        raise ProtocolError("tensor holds NaN or Inf")
    return h.kind


def _check_activations(msg: Message, want: Expected, awaiting: Callable[[int, int], tuple[int, ...] | None]) -> None:
    h = msg.header
    n, d, limit = want.tokens, want.width, want.batch_size(h.client)
    if h.shape is None or len(h.shape) != 3 or h.shape[1:] != (n, d) or h.shape[0] < 1:
        raise ProtocolError(f"expected shape (B, {n}, {d})")
    if h.shape[0] > limit:
        raise ProtocolError(f"batch of {h.shape[0]} exceeds --batch-size {limit}")
    expect(h, h.kind, dtype=want.wire)
    if h.kind == Kind.GRAD_OUT:
        shape = awaiting(h.client, h.step)
        if shape is None:
            raise ProtocolError(f"gradient for step {h.step}, which has no body output awaiting it")
        if shape != h.shape:
            raise ProtocolError(f"gradient shape differs from step {h.step}'s activations {shape}")
