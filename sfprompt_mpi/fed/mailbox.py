"""A client host's mailbox: the server's messages, with control messages and late replies handled here.

Training code asks for the reply it waits for (:meth:`Mailbox.recv`); the
mailbox answers KEEPALIVE (restarts the wait), REJECT (the running client
leaves its round: :class:`Rejected`; a client not yet run is remembered and
skipped), a START or STOP while a client still runs (the server moved on
without it) and replies addressed to a client that has already left.
"""

from __future__ import annotations

import collections
import logging

from ..comm.protocol import Header, Kind, Message, Transport

log = logging.getLogger(__name__)

SERVER = 0


class Rejected(Exception):
    """The server refused one of this client's messages: the client leaves the round.
    ``client``: which one, when several run at once (None: every running client leaves)."""

    def __init__(self, why: str, client: int | None = None) -> None:
        super().__init__(why)
        self.client = client


def attempt_of(h: Header) -> tuple[int, int]:
    """(round, attempt) of a message."""
    return h.round, h.attempt


class Mailbox:
    """The messages from the server to one client host."""

    def __init__(self, transport: Transport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout
        #: (round, attempt, client) of the clients training now (one, or a host's clients in lockstep).
        self.running: set[tuple[int, int, int]] = set()
        self._inbox: collections.deque[Message] = collections.deque()  # taken in by drain, not yet used
        self._held: dict[tuple[int, int, int], Message] = {}  # (kind, client, step) -> a reply not yet asked for
        self._dropped: set[tuple[int, int, int]] = set()  # (round, attempt, client) dropped before it ran

    def recv(self, what: str) -> Message:
        """The next message from the server that is still of use; waits ``--client-timeout`` at most
        between messages (the server's KEEPALIVEs restart the wait while it serves others).

        Raises :class:`Rejected` when the server dropped the client now running.
        """
        while True:
            if self._inbox:
                msg = self._inbox.popleft()
            else:
                msg = self.transport.recv(SERVER, timeout=self.timeout, waiting_for=what)
            if self._take(msg):
                return msg

    def reply(self, kind: Kind, cid: int, step: int, what: str) -> Message:
        """The server's ``kind`` reply to client ``cid``'s ``step``; replies to the other running
        clients that come first are held until asked for (clients in lockstep)."""
        key = (int(kind), cid, step)
        while key not in self._held:
            msg = self.recv(what)
            if len(self.running) <= 1:
                return msg  # one client: anything else is a protocol error, which the caller's check reports
            h = msg.header
            self._held[(int(h.kind), h.client, h.step)] = msg
        return self._held.pop(key)

    def drain(self) -> None:
        """Take in, without waiting, what the server has already sent (REJECTs of clients not yet run)."""
        while self.transport.poll(SERVER):
            msg = self.transport.recv(SERVER, timeout=self.timeout, waiting_for="a message already announced")
            if msg.header.kind in (Kind.REJECT, Kind.KEEPALIVE):
                self._take(msg)
            else:
                self._inbox.append(msg)

    def dropped(self, rnd: int, attempt: int, cid: int) -> bool:
        """Whether the server dropped client ``cid`` from this attempt before it started."""
        return (rnd, attempt, cid) in self._dropped

    def new_attempt(self, rnd: int, attempt: int) -> None:
        """Forget the drops of earlier attempts."""
        self._dropped = {k for k in self._dropped if k[:2] >= (rnd, attempt)}

    def _take(self, msg: Message) -> bool:
        """Whether ``msg`` is for the caller; handles control messages and late replies itself."""
        h = msg.header
        key = (*attempt_of(h), h.client)
        if h.kind == Kind.KEEPALIVE:
            return False
        if h.kind == Kind.REJECT:
            if key in self.running:
                self._held = {k: m for k, m in self._held.items() if k[1] != h.client}
                raise Rejected("the server dropped it" + (f" at step {h.step}" if h.step >= 0 else ""), h.client)
            # A client that has not started yet, or whose upload already left.
            self._dropped.add(key)
            log.warning("round %d: the server dropped client %d", key[0], h.client)
            return False
        if h.kind in (Kind.START, Kind.STOP) and self.running:
            # The server moved on without the running client (its REJECT went missing): leave too.
            self._inbox.appendleft(msg)
            raise Rejected(f"the server went on to {h.describe()}")
        if h.kind in (Kind.BODY_OUT, Kind.GRAD_ACTS) and key not in self.running:
            # A reply to a client that has since left its round: nobody waits for it.
            log.warning("discarded a late %s", h.describe())
            return False
        return True
