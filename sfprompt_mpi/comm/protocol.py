"""Wire format: message kinds, the fixed-size header, and the Transport protocol.

Every message is a header (a fixed array of int64, packed by :func:`pack_header`
and checked by :func:`unpack_header`) followed, when the header says so, by one
raw tensor buffer. Tensors are never pickled. The header names what the
payload is (kind, round, client, step), its dtype and shape, and one spare
integer (``aux``) whose meaning depends on the kind.

Tensor shape legend used across the package:
    B batch, C channels, H/W image size, N tokens (class + prompts + patches),
    D embedding width, K classes, P prompt tokens, F flat parameter count.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

MAGIC = 0x5346_5052  # "SFPR"
MAX_DIMS = 6
HEADER_LEN = 8 + MAX_DIMS
HEADER_BYTES = HEADER_LEN * 8
ANY_SOURCE = -1
#: Payloads larger than this are refused on receipt (a corrupt or hostile header).
MAX_PAYLOAD_BYTES = 8 << 30


class Kind(enum.IntEnum):
    """Message kinds. The value is what travels in the header."""

    START = 1        # server -> host: round begins; payload int64 client ids for this host
    PARAMS = 2       # server -> host: global trainable vector F for one client
    ACTS = 3         # client -> server: smashed activations BND; aux=1 if gradients will follow
    BODY_OUT = 4     # server -> client: body output BND
    GRAD_OUT = 5     # client -> server: dL/d(body output) BND
    GRAD_ACTS = 6    # server -> client: dL/d(activations) BND
    UPDATE = 7       # client -> server: trained trainable vector F; aux = local sample count
    REJECT = 8       # server -> host: the client's message was refused; it leaves this round
    STOP = 9         # server -> host: no more rounds
    ERROR = 10       # any -> any: the sender failed; aux = sender's rank
    KEEPALIVE = 11   # server -> host: still alive, busy with other clients (restarts the host's wait)

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {k: k.name.lower() for k in Kind}
_KINDS = {int(k): k for k in Kind}

#: A retried round's messages carry ``round + attempt * ROUND_ATTEMPT_STRIDE`` in the
#: header's round field (its *tag*), so a straggler's message from an earlier
#: attempt is recognised and discarded. The first attempt's tag is the round itself.
ROUND_ATTEMPT_STRIDE = 1 << 32


def round_tag(rnd: int, attempt: int = 0) -> int:
    """The header round field of ``attempt`` (0: the first) of round ``rnd``."""
    return rnd + attempt * ROUND_ATTEMPT_STRIDE


def round_of(tag: int) -> int:
    """The round a header round field (a :func:`round_tag`) belongs to."""
    return tag % ROUND_ATTEMPT_STRIDE


DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64,
    5: torch.int64, 6: torch.int32, 7: torch.uint8,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


class ProtocolError(Exception):
    """A received message is malformed or not what the receiver expected."""


class PayloadTimeout(TimeoutError):
    """A header arrived but its payload did not: the channel to that rank is broken.

    Unlike a plain ``TimeoutError`` (nothing arrived), this one cannot be
    survived by dropping the sender: the payload may still land later."""


class Header(NamedTuple):
    """What a message is. ``shape`` is empty for messages without a payload.

    A named tuple, not a frozen dataclass: every message builds one or two,
    and a tuple is built in a third of the time (0.4 us instead of 1.2 us)."""

    kind: Kind
    round: int = 0
    client: int = -1
    step: int = 0
    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] | None = None
    aux: int = 0

    @property
    def has_payload(self) -> bool:
        return self.shape is not None

    @property
    def nbytes(self) -> int:
        if self.shape is None:
            return 0
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape)) if self.shape is not None else "-"
        return (f"{self.kind.label}(round={self.round}, client={self.client}, step={self.step}, "
                f"{str(self.dtype).removeprefix('torch.')}[{shape}])")


def header_for(kind: Kind, tensor: torch.Tensor | None, *, round: int = 0, client: int = -1,
               step: int = 0, aux: int = 0) -> Header:
    """The header describing ``tensor`` (or no payload when it is None)."""
    if tensor is None:
        return Header(kind, round, client, step, torch.float32, None, aux)
    return Header(kind, round, client, step, tensor.dtype, tuple(tensor.shape), aux)


_HEADER_STRUCT = struct.Struct(f"={HEADER_LEN}q")   # native order, as the int64 buffer MPI carries
_ZEROS = (0,) * MAX_DIMS


def pack_header(h: Header) -> np.ndarray:
    """Header -> int64[HEADER_LEN] ready for a buffer send."""
    if h.shape is not None and len(h.shape) > MAX_DIMS:
        raise ProtocolError(f"{h.describe()}: more than {MAX_DIMS} dimensions")
    code = DTYPE_CODES.get(h.dtype)
    if code is None:
        raise ProtocolError(f"{h.describe()}: dtype not allowed on the wire")
    dims = () if h.shape is None else h.shape
    ndim = -1 if h.shape is None else len(dims)
    return np.frombuffer(bytearray(_HEADER_STRUCT.pack(MAGIC, h.kind, h.round, h.client, h.step, code, ndim, h.aux, *dims,
                                                       *_ZEROS[:MAX_DIMS - len(dims)])), dtype=np.int64)


def unpack_header(buf: np.ndarray) -> Header:
    """int64[HEADER_LEN] -> Header, refusing anything malformed."""
    if buf.shape != (HEADER_LEN,):
        raise ProtocolError("bad header: wrong length or magic number")
    magic, kind, rnd, client, step, dcode, ndim, aux, *dims = buf.tolist()  # plain ints: on every message
    if magic != MAGIC:
        raise ProtocolError("bad header: wrong length or magic number")
    kind_e = _KINDS.get(kind)
    if kind_e is None:
        raise ProtocolError(f"bad header: unknown message kind {kind}")
    dtype = DTYPES.get(dcode)
    if dtype is None:
        raise ProtocolError(f"bad header: unknown dtype code {dcode}")
    if not -1 <= ndim <= MAX_DIMS:
        raise ProtocolError(f"bad header: {ndim} dimensions")
    shape = None if ndim < 0 else tuple(dims[:ndim])
    if shape is not None and min(shape, default=0) < 0:
        raise ProtocolError(f"bad header: negative shape {shape}")
    h = Header(kind_e, rnd, client, step, dtype, shape, aux)
    if h.nbytes > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"bad header: {h.describe()} payload of {h.nbytes} bytes exceeds the limit")
    return h


def expect(h: Header, kind: Kind, *, round: int | None = None, client: int | None = None,
           step: int | None = None, shape: tuple[int, ...] | None = None,
           dtype: torch.dtype | None = None) -> None:
    """Check a received header against what the receiver is waiting for."""
    want = {"kind": kind, "round": round, "client": client, "step": step, "shape": shape, "dtype": dtype}
    for field, value in want.items():
        if value is not None and getattr(h, field) != value:
            raise ProtocolError(f"expected {field}={value!r}, got {h.describe()}")


@dataclass
class Message:
    """A received message: who sent it, its header and its payload (None if none)."""

    source: int
    header: Header
    payload: torch.Tensor | None


class ByteCounter:
    """Bytes sent and received, per message kind and per peer rank, headers included."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.recv: dict[str, int] = {}
        self.sent_to: dict[int, int] = {}
        self.recv_from: dict[int, int] = {}

    def count_sent(self, peer: int, h: Header) -> None:
        n = HEADER_BYTES + h.nbytes
        self.sent[h.kind.label] = self.sent.get(h.kind.label, 0) + n
        self.sent_to[peer] = self.sent_to.get(peer, 0) + n

    def count_recv(self, peer: int, h: Header) -> None:
        n = HEADER_BYTES + h.nbytes
        self.recv[h.kind.label] = self.recv.get(h.kind.label, 0) + n
        self.recv_from[peer] = self.recv_from.get(peer, 0) + n

    def snapshot_and_reset(self) -> dict[str, dict]:
        """This round's counts; the counters start again at zero."""
        snap = {"sent": self.sent, "recv": self.recv, "sent_to": self.sent_to, "recv_from": self.recv_from}
        self.__init__()
        return snap


class Transport(Protocol):
    """Point-to-point tensor messages between ranks.

    ``send`` never blocks on the receiver (sends complete in the background;
    ``close`` waits for them). ``recv`` returns the next message from
    ``source`` (or any rank) and raises ``TimeoutError`` naming what it waited
    for when nothing arrives within ``timeout`` seconds; once a header has
    arrived its payload gets ``payload_timeout`` seconds (default: ``timeout``)
    before :class:`PayloadTimeout`.
    """

    rank: int
    size: int
    counter: ByteCounter

    def send(self, dest: int, header: Header, payload: torch.Tensor | None = None) -> None: ...

    def recv(self, source: int = ANY_SOURCE, *, timeout: float, waiting_for: str = "a message",
             payload_timeout: float | None = None) -> Message: ...

    def poll(self, source: int = ANY_SOURCE) -> bool: ...

    def close(self) -> None: ...
