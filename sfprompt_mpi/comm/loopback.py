"""In-process transport: every rank is a thread, every message is a copy.

The single-process reference run uses it, so the server and client code and
the message sequence are exactly those of an MPI run. Payloads are cloned on
send and packed/unpacked through the real header functions, so aliasing or a
header bug shows up here too.
"""

from __future__ import annotations

import collections
import threading
import time

import torch

from .protocol import ANY_SOURCE, ByteCounter, Header, Message, pack_header, unpack_header


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
        self.counter = ByteCounter()

    def send(self, dest: int, header: Header, payload: torch.Tensor | None = None) -> None:
        wire = pack_header(header)
        data = None if payload is None else payload.detach().to("cpu", copy=True).contiguous()
        self.counter.count_sent(dest, header)
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
        self.counter.count_recv(src, header)
        return Message(src, header, data)

    def poll(self, source: int = ANY_SOURCE) -> bool:
        with self.hub._cond:
            return any(source == ANY_SOURCE or item[0] == source for item in self.hub._boxes[self.rank])

    def close(self) -> None:
        pass
