"""Wire format: message kinds, the fixed-size header, and the Transport protocol.

Every message is a header (a fixed array of int64, packed by :func:`pack_header`
and checked by :func:`unpack_header`) followed, when the header says so, by one
raw tensor buffer. Tensors are never pickled. The header names what the
payload is (kind, round, attempt, client, step), its dtype and shape, and one
spare integer (``aux``) whose meaning depends on the kind. A transport builds
the header itself from what ``send`` is given (:func:`outgoing`), so header
and payload cannot disagree.

Checks that every transport makes live here, once: :func:`outgoing` on send,
:func:`unpack_header` (or :func:`unpack_words`) and :func:`check_arrived` on receipt. Byte counting,
timing and fault injection wrap any transport from outside
(:mod:`.wrappers`).

Tensor shape legend used across the package:
    B batch, C channels, H/W image size, N tokens (class + prompts + patches),
    D embedding width, K classes, P prompt tokens, F flat parameter count.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch

from ..config import WIRE_DTYPES

MAGIC = 0x5346_5052  # "SFPR"
MAX_DIMS = 6
#: magic, kind, round, client, step, dtype code, ndim, aux, MAX_DIMS dims, attempt
HEADER_LEN = 9 + MAX_DIMS
HEADER_BYTES = HEADER_LEN * 8  # 120
ANY_SOURCE = -1
#: Payloads larger than this are refused on receipt (a corrupt or hostile header).
MAX_PAYLOAD_BYTES = 8 << 30


class Kind(enum.IntEnum):
    """Message kinds. The value is what travels in the header."""

    START = 1        # server -> host: round begins; payload int64 client ids for this host
    PARAMS = 2       # server -> host: global trainable vector F for one client; aux = its batch size
    ACTS = 3         # client -> server: smashed activations BND; aux=1 if gradients will follow
    BODY_OUT = 4     # server -> client: body output BND
    GRAD_OUT = 5     # client -> server: dL/d(body output) BND
    GRAD_ACTS = 6    # server -> client: dL/d(activations) BND
    UPDATE = 7       # client -> server: trained trainable vector F; aux = its aggregation weight
    REJECT = 8       # server -> host: the client's message was refused; it leaves this round
    STOP = 9         # server -> host: no more rounds
    KEEPALIVE = 11   # server -> host: still alive, busy with other clients (restarts the host's wait)

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {k: k.name.lower() for k in Kind}
_KINDS = {int(k): k for k in Kind}

DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64,
    5: torch.int64, 6: torch.int32, 7: torch.uint8,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
#: ``--wire-dtype`` name -> the dtype activations and gradients travel in.
WIRE_TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WIRE_DTYPES}


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype of the ``--wire-dtype`` called ``name``."""
    return WIRE_TORCH_DTYPES[name]


def to_wire(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` detached and cast to the wire dtype, ready for ``send``."""
    return t.detach().to(dtype)


def from_wire(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A received wire tensor as float32 on ``device`` (for compute)."""
    return t.to(device, torch.float32)


class ProtocolError(Exception):
    """A received message is malformed or not what the receiver expected."""


class PayloadTimeout(TimeoutError):
    """A header arrived but its payload did not: the channel to that rank is broken.

    Unlike a plain ``TimeoutError`` (nothing arrived), this one cannot be
    survived by dropping the sender: the payload may still land later."""


class Header(NamedTuple):
    """What a message is. ``shape`` is None for messages without a payload.

    ``attempt`` numbers the tries of a round (0: the first): a retried round's
    messages carry the retry's number, so a straggler's message from an
    earlier attempt is recognised and discarded.

    A named tuple, not a frozen dataclass: every message builds one or two,
    and a tuple is built in a third of the time (0.4 us instead of 1.2 us)."""

    kind: Kind
    round: int = 0
    client: int = -1
    step: int = 0
    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] | None = None
    aux: int = 0
    attempt: int = 0

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
        at = f", attempt={self.attempt}" if self.attempt else ""
        return (f"{self.kind.label}(round={self.round}{at}, client={self.client}, step={self.step}, "
                f"{str(self.dtype).removeprefix('torch.')}[{shape}])")


def outgoing(kind: Kind, tensor: torch.Tensor | None, round: int = 0, attempt: int = 0, client: int = -1,
             step: int = 0, aux: int = 0) -> Header:
    """The header of a message about to be sent, describing ``tensor`` (None: no payload).

    Every transport's ``send`` builds its header here, so each refuses the
    same things before anything leaves: a kind that is not a :class:`Kind`,
    a dtype the wire does not carry, more than ``MAX_DIMS`` dimensions, and
    a payload over ``MAX_PAYLOAD_BYTES`` (the receiver would refuse it).
    Transports send the payload contiguous whatever its layout.
    """
    if type(kind) is not Kind:
        raise ProtocolError(f"send: message kind {kind!r} is not a Kind")
    if tensor is None:
        return Header(kind, round, client, step, torch.float32, None, aux, attempt)
    h = Header(kind, round, client, step, tensor.dtype, tuple(tensor.shape), aux, attempt)
    if h.dtype not in DTYPE_CODES:
        raise ProtocolError(f"send: {h.describe()}: dtype not allowed on the wire")
    if len(h.shape) > MAX_DIMS:
        raise ProtocolError(f"send: {h.describe()}: more than {MAX_DIMS} dimensions")
    if h.nbytes > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"send: {h.describe()}: payload of {h.nbytes} bytes exceeds the limit")
    return h


def check_arrived(h: Header, came: int, *, rank: int, src: int) -> None:
    """Refuse a payload of ``came`` bytes whose header announced another size (every transport's receive)."""
    if came != h.nbytes:
        raise ProtocolError(f"rank {rank}: {h.describe()} from rank {src} announced {h.nbytes} bytes but {came} came")


_HEADER_STRUCT = struct.Struct(f"={HEADER_LEN}q")   # native order, as the int64 buffer MPI carries
_ZEROS = (0,) * MAX_DIMS


def pack_header(h: Header) -> np.ndarray:
    """Header -> int64[HEADER_LEN] ready for a buffer send."""
    return np.frombuffer(bytearray(header_bytes(h)), dtype=np.int64)


def header_bytes(h: Header) -> bytes:
    """Header -> the HEADER_BYTES bytes of its int64[HEADER_LEN] form (what :func:`pack_header` holds),
    as a read-only buffer a send can take without building an array: 1.8 instead of 3.5 us
    with the checks (micro ViT activations, this VM)."""
    if h.shape is not None and len(h.shape) > MAX_DIMS:
        raise ProtocolError(f"{h.describe()}: more than {MAX_DIMS} dimensions")
    code = DTYPE_CODES.get(h.dtype)
    if code is None:
        raise ProtocolError(f"{h.describe()}: dtype not allowed on the wire")
    dims = () if h.shape is None else h.shape
    ndim = -1 if h.shape is None else len(dims)
    return _HEADER_STRUCT.pack(MAGIC, h.kind, h.round, h.client, h.step, code, ndim, h.aux, *dims,
                               *_ZEROS[:MAX_DIMS - len(dims)], h.attempt)


def unpack_header(buf: np.ndarray) -> Header:
    """int64[HEADER_LEN] -> Header, refusing anything malformed."""
    if buf.shape != (HEADER_LEN,):
        raise ProtocolError("bad header: wrong length or magic number")
    return unpack_words(buf.tolist())  # plain ints: on every message


def unpack_words(words: list[int]) -> Header:
    """The header's HEADER_LEN int64 values, as plain ints, -> Header, with every check of :func:`unpack_header`.

    For a receiver that reads its header out of a buffer it reuses: the list is
    the copy it needs anyway, so no array is built per message."""
    if len(words) != HEADER_LEN:
        raise ProtocolError("bad header: wrong length or magic number")
    magic, kind, rnd, client, step, dcode, ndim, aux, *dims, attempt = words
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
    if attempt < 0:
        raise ProtocolError(f"bad header: attempt {attempt}")
    h = Header(kind_e, rnd, client, step, dtype, shape, aux, attempt)
    if h.nbytes > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"bad header: {h.describe()} payload of {h.nbytes} bytes exceeds the limit")
    return h


def expect(h: Header, kind: Kind, *, round: int | None = None, attempt: int | None = None,
           client: int | None = None, step: int | None = None, shape: tuple[int, ...] | None = None,
           dtype: torch.dtype | None = None) -> None:
    """Check a received header against what the receiver is waiting for."""
    want = {"kind": kind, "round": round, "attempt": attempt, "client": client, "step": step, "shape": shape,
            "dtype": dtype}
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
    """Bytes sent and received, per message kind and per peer rank, headers included
    (kept by :class:`~.wrappers.Counted`)."""

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

    ``send`` builds the header from its arguments and ``tensor`` (see
    :func:`outgoing`), queues the message and returns that header; it never
    blocks on the receiver (sends complete in the background; ``close`` waits
    for them). ``recv`` returns the next message from
    ``source`` (or any rank) and raises ``TimeoutError`` naming what it waited
    for when nothing arrives within ``timeout`` seconds; once a header has
    arrived its payload gets ``payload_timeout`` seconds (default: ``timeout``)
    before :class:`PayloadTimeout`.

    ``on_header``, when set (by :class:`~.wrappers.Timed`), is called inside
    ``recv`` the moment a header has arrived, before its payload is received:
    the one hook a wrapper needs to tell waiting from transfer.
    """

    rank: int
    size: int
    on_header: Callable[[], None] | None

    def send(self, dest: int, kind: Kind, tensor: torch.Tensor | None = None, *, round: int = 0, attempt: int = 0,
             client: int = -1, step: int = 0, aux: int = 0) -> Header: ...

    def recv(self, source: int = ANY_SOURCE, *, timeout: float, waiting_for: str = "a message",
             payload_timeout: float | None = None) -> Message: ...

    def poll(self, source: int = ANY_SOURCE) -> bool: ...

    def close(self) -> None: ...
