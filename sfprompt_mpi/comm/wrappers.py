"""What every transport can do, added from outside: byte counting, timing, fault injection.

Each wrapper takes any :class:`~.protocol.Transport` and is one itself, so
they stack; ``runtime.py`` builds the stack once per rank and hands it to the
roles::

    Faulty(Timed(Counted(raw), clock), fault, timeout)   # Timed: benchmarks only; Faulty: --inject-fault

Counted sits innermost so that it counts what really goes on the wire (a
fault's corrupted tensor included). Anything a wrapper does not define (the
MPI communicator, ``counter`` of an inner ``Counted``) is read through to the
transport it wraps.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import torch

from ..config import Fault
from .protocol import ANY_SOURCE, ByteCounter, Header, Kind, Message, Transport

log = logging.getLogger(__name__)


class Wrapper:
    """A transport that passes everything to ``inner``; subclasses change what they need."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size

    @property
    def raw(self) -> Transport:
        """The transport at the bottom of the stack."""
        return getattr(self.inner, "raw", self.inner)

    def send(self, dest: int, kind: Kind, tensor: torch.Tensor | None = None, **fields: int) -> Header:
        return self.inner.send(dest, kind, tensor, **fields)

    def recv(self, source: int = ANY_SOURCE, **kwargs: Any) -> Message:
        return self.inner.recv(source, **kwargs)

    def poll(self, source: int = ANY_SOURCE) -> bool:
        return self.inner.poll(source)

    def close(self, **kwargs: Any) -> None:
        self.inner.close(**kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __enter__(self) -> "Wrapper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Counted(Wrapper):
    """Counts every message's bytes (header + payload) per kind and per peer in ``counter``."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.counter = ByteCounter()

    def send(self, dest: int, kind: Kind, tensor: torch.Tensor | None = None, **fields: int) -> Header:
        h = self.inner.send(dest, kind, tensor, **fields)
        self.counter.count_sent(dest, h)
        return h

    def recv(self, source: int = ANY_SOURCE, **kwargs: Any) -> Message:
        msg = self.inner.recv(source, **kwargs)
        self.counter.count_recv(msg.source, msg.header)
        return msg


class Clock(Protocol):
    """Where :class:`Timed` reports."""

    def add(self, part: str, seconds: float) -> None:
        """``seconds`` more of ``part``: ``send_s`` (inside send), ``wait_s`` (in recv until a header
        arrived, or until it timed out) or ``payload_s`` (from a header's arrival to its payload in a tensor)."""

    def message(self, h: Header, now: float) -> None:
        """``h`` was sent or received at ``now`` (``time.perf_counter``)."""


class Timed(Wrapper):
    """Splits the time spent in the transport into send, wait and payload time (see :class:`Clock`).

    The wait/payload split uses the bottom transport's ``on_header`` hook."""

    def __init__(self, inner: Transport, clock: Clock) -> None:
        super().__init__(inner)
        self.clock = clock
        self._arrived = 0.0
        raw = self.raw
        if getattr(raw, "on_header", None) is not None:
            raise RuntimeError("the transport's on_header hook is taken: one Timed per transport")
        raw.on_header = self._header_arrived

    def _header_arrived(self) -> None:
        self._arrived = time.perf_counter()

    def send(self, dest: int, kind: Kind, tensor: torch.Tensor | None = None, **fields: int) -> Header:
        t0 = time.perf_counter()
        h = self.inner.send(dest, kind, tensor, **fields)
        t1 = time.perf_counter()
        self.clock.add("send_s", t1 - t0)
        self.clock.message(h, t1)
        return h

    def recv(self, source: int = ANY_SOURCE, **kwargs: Any) -> Message:
        self._arrived = 0.0
        t0 = time.perf_counter()
        try:
            msg = self.inner.recv(source, **kwargs)
        finally:
            t1 = time.perf_counter()
            arrived = self._arrived or t1
            self.clock.add("wait_s", arrived - t0)
            self.clock.add("payload_s", t1 - arrived)
        self.clock.message(msg.header, t1)
        return msg


#: Faults injected into the first ACTS of the fault's round; ``huge-norm`` goes into the first UPDATE.
ACTS_FAULTS = ("wrong-shape", "nan", "crash", "hang", "slow")


class Faulty(Wrapper):
    """Injects ``--inject-fault`` ``fault`` into what rank ``fault.rank`` sends in round ``fault.round``.

    The fault fires once, on the first message of its kind that the rank
    sends in that round's first attempt (so in its first client to get
    there; a retry of the round runs clean): ``wrong-shape`` drops the last
    token of the ACTS, ``nan`` fills it with NaN, ``crash`` raises, ``hang``
    and ``slow`` sleep 3 and 0.5 x ``timeout`` before sending it, and
    ``huge-norm`` sends the UPDATE ``global + (update - global) * 1e6``
    where ``global`` is the PARAMS vector this rank received for that client.
    """

    def __init__(self, inner: Transport, fault: Fault, timeout: float) -> None:
        super().__init__(inner)
        self.fault = fault
        self.timeout = timeout
        self._trigger = Kind.UPDATE if fault.kind == "huge-norm" else Kind.ACTS
        self._armed = fault.rank == self.rank
        self._globals: dict[int, torch.Tensor] = {}  # client -> its PARAMS of the fault's round (huge-norm)

    def _due(self, h_round: int, attempt: int) -> bool:
        return self._armed and h_round == self.fault.round and attempt == 0

    def recv(self, source: int = ANY_SOURCE, **kwargs: Any) -> Message:
        msg = self.inner.recv(source, **kwargs)
        h = msg.header
        if h.kind == Kind.PARAMS and self._trigger == Kind.UPDATE and self._due(h.round, h.attempt):
            self._globals[h.client] = msg.payload
        return msg

    def send(self, dest: int, kind: Kind, tensor: torch.Tensor | None = None, **fields: int) -> Header:
        if kind == self._trigger and self._due(fields.get("round", 0), fields.get("attempt", 0)):
            self._armed = False
            tensor = self._inject(tensor, fields.get("client", -1))
            self._globals.clear()
        return self.inner.send(dest, kind, tensor, **fields)

    def _inject(self, x: torch.Tensor, client: int) -> torch.Tensor:
        kind = self.fault.kind
        log.warning("injecting fault %s", kind)
        if kind == "huge-norm":
            global_F = self._globals[client]
            return global_F + (x - global_F) * 1e6
        if kind == "wrong-shape":
            return x[:, :-1].contiguous()
        if kind == "nan":
            return torch.full_like(x, float("nan"))
        if kind == "crash":
            raise RuntimeError("injected crash (--inject-fault)")
        time.sleep(self.timeout * (3 if kind == "hang" else 0.5))
        return x


def wrap_transport(raw: Transport, *, fault: Fault | None = None, timeout: float = 0.0,
                   clock: Clock | None = None) -> Transport:
    """``raw`` counted, timed into ``clock`` (when given), and injecting ``fault`` on its rank (when given)."""
    t: Transport = Counted(raw)
    if clock is not None:
        t = Timed(t, clock)
    if fault is not None and fault.rank == raw.rank:
        t = Faulty(t, fault, timeout)
    return t
