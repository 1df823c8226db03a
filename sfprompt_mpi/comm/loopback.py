"""In-process transport: every rank is a thread, every message is a copy.

The single-process reference run uses it, so the server and client code and
the message sequence are exactly those of an MPI run. Payloads are cloned on
send, and headers are built, packed, unpacked and checked through the same
functions as MPI's (:func:`~.protocol.outgoing`, :func:`~.protocol.unpack_header`,
:func:`~.protocol.check_arrived`), so aliasing, a header bug or a refused
message shows up here too.
"""

from __future__ import annotations

import collections
import threading
import time

from typing import Callable

import torch

from .protocol import ANY_SOURCE, Header, Kind, Message, check_arrived, outgoing, pack_header, unpack_header


class LoopbackHub:
    """Shared mailboxes for ``size`` in-process ranks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._boxes: list[collections.deque] = [collections.deque() for _ in range(size)]
        self._failure: str | None = None

    def endpoint(self, rank: int) -> "LoopbackTransport":
        return LoopbackTransport(self, rank)

    def abort(self, reason: str) -> None:
        """Wake every waiting rank with ``reason`` (a rank failed)."""
        with self._cond:
            if self._failure is None:
                self._failure = reason
            self._cond.notify_all()


class LoopbackTransport:
    """One rank's end of a :class:`LoopbackHub`."""

    def __init__(self, hub: LoopbackHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.size = hub.size
        self.on_header: Callable[[], None] | None = None  # see Transport.on_header
        self._closed = False

    def send(self, dest: int, kind: Kind, tensor: torch.Tensor | None = None, *, round: int = 0, attempt: int = 0,
             client: int = -1, step: int = 0, aux: int = 0) -> Header:
        """Put a copy of the message in ``dest``'s mailbox; -> its header."""
        self._check_open()
        header = outgoing(kind, tensor, round, attempt, client, step, aux)
        wire = pack_header(header)
        data = None if tensor is None else tensor.detach().to("cpu", copy=True).contiguous()
        self.push(dest, wire, data)
        return header

    def push(self, dest: int, wire, data: torch.Tensor | None) -> None:
        """Deliver a packed header and payload as they are (tests use it to send malformed messages)."""
        with self.hub._cond:
            self.hub._boxes[dest].append((self.rank, wire, data))
            self.hub._cond.notify_all()

    def _take(self, source: int):
        box = self.hub._boxes[self.rank]
        for i, item in enumerate(box):
            if source == ANY_SOURCE or item[0] == source:
                del box[i]
                return item
        return None

    def recv(self, source: int = ANY_SOURCE, *, timeout: float, waiting_for: str = "a message",
             payload_timeout: float | None = None) -> Message:  # a payload arrives with its header here
        self._check_open()
        deadline = time.monotonic() + timeout
        with self.hub._cond:
            while True:
                if self.hub._failure is not None:
                    raise RuntimeError(f"rank {self.rank}: peer failed: {self.hub._failure}")
                item = self._take(source)
                if item is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    who = "any rank" if source == ANY_SOURCE else f"rank {source}"
                    raise TimeoutError(f"rank {self.rank}: no message from {who} within {timeout:g} s "
                                       f"while waiting for {waiting_for}")
                self.hub._cond.wait(left)
        src, wire, data = item
        header = unpack_header(wire)
        if self.on_header is not None:
            self.on_header()
        if data is not None or header.has_payload:
            check_arrived(header, 0 if data is None else data.nbytes, rank=self.rank, src=src)
            if not header.has_payload:
                data = None
            elif data is None or data.dtype != header.dtype or tuple(data.shape) != header.shape:
                data = _reinterpret(data, header)  # a pushed raw message: its bytes, as the header says
        return Message(src, header, data)

    def poll(self, source: int = ANY_SOURCE) -> bool:
        self._check_open()
        with self.hub._cond:
            return any(source == ANY_SOURCE or item[0] == source for item in self.hub._boxes[self.rank])

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"rank {self.rank}: transport used after close()")



def _reinterpret(data: torch.Tensor | None, header: Header) -> torch.Tensor:
    out = torch.empty(header.shape, dtype=header.dtype)
    if data is not None:
        out.reshape(-1).view(torch.uint8).copy_(data.reshape(-1).view(torch.uint8))
    return out
