"""Serving one round attempt: the server's answers to ACTS and GRAD_OUT until every client's UPDATE.

:class:`Attempt` is the whole state of one attempt (clients still in it,
activations waiting for a body pass, batches whose graphs are kept, who was
heard from when, updates received); :class:`BodyService` runs an attempt to
its end over the transport. Which activations may share a body pass and in
what order clients are served follows from the algorithm's body
(:mod:`.body`): a frozen body batches whatever has arrived, up to
``--server-batch`` clients; a trained body serves one client at a time, in
client-id order.
"""

from __future__ import annotations

import bisect
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..comm.protocol import ANY_SOURCE, HEADER_BYTES, Kind, Message, PayloadTimeout, ProtocolError, Transport, \
    from_wire, to_wire
from ..config import Config
from .aggregate import Updates
from .body import FrozenBody
from .checks import Expected, Late, check_message

log = logging.getLogger(__name__)


@dataclass
class Group:
    """Activations of one or more clients that went through one body pass."""

    members: list[Message]                 # the ACTS messages, in batch order
    acts_BND: torch.Tensor                 # concatenated activations (leaf when a graph is kept)
    out_BND: torch.Tensor | None           # body output with graph, or None (recompute on backward)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # member index -> dL/dout


class Owing:
    """The clients of an attempt that still owe their update, kept as updates arrive and clients leave.

    The server asks after every message who is still owing (the first in id order, their hosts, a few
    ids for the wait's description): kept in order instead of recomputed, that costs a few operations
    per message rather than a sort of every client of the round (a fifth of the server's time with
    5000 clients, ``docs/benchmarks.md``, twelfth session).
    """

    def __init__(self, clients: list[int], host_of: dict[int, int]) -> None:
        self.ids = sorted(set(clients))
        self._host_of = host_of
        self._per_host = collections.Counter(host_of[c] for c in self.ids)

    def settle(self, cid: int) -> None:
        """Client ``cid`` owes nothing any more (its update arrived, or it left); again: nothing."""
        i = bisect.bisect_left(self.ids, cid)
        if i < len(self.ids) and self.ids[i] == cid:
            del self.ids[i]
            host = self._host_of[cid]
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]

    def hosts(self) -> set[int]:
        """The host ranks of the owing clients."""
        return set(self._per_host)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Attempt:
    """The state of one round attempt on the server."""

    want: Expected
    updates: Updates
    active: set[int]                                   # clients still in the attempt
    owing: Owing                                       # those of them whose update has not arrived
    heard: dict[int, float]                            # host rank -> when it last sent something
    next_ping: float                                   # when the hosts hear the next KEEPALIVE
    pending: list[Message] = field(default_factory=list)           # ACTS awaiting a body pass
    groups: dict[int, Group] = field(default_factory=dict)         # body passes awaiting gradients
    where: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (client, step) -> (group, index)
    next_group: int = 0
    timed_out: set[int] = field(default_factory=set)   # clients whose host went silent
    client_bytes: dict[int, int] = field(default_factory=dict)     # bytes received per client
    #: What the simulated clock prices: per client its body requests (step, batch, message bytes,
    #: gradient comes back) and its update's bytes, as they arrived.
    requests: dict[int, list[tuple[int, int, int, bool]]] = field(default_factory=dict)
    update_bytes: dict[int, int] = field(default_factory=dict)
    stat: dict[str, float] = field(default_factory=lambda: {"fwd": 0.0, "bwd": 0.0, "wait": 0.0, "passes": 0,
                                                            "samples": 0})

    def awaiting(self, cid: int, step: int) -> tuple[int, ...] | None:
        """Shape of client ``cid``'s activations of ``step`` whose body output awaits a gradient."""
        if (cid, step) not in self.where:
            return None
        gid, idx = self.where[(cid, step)]
        return self.groups[gid].members[idx].header.shape

    def served(self) -> dict[str, float]:
        s = self.stat
        return {"body_fwd_s": s["fwd"], "body_bwd_s": s["bwd"], "queue_wait_s": s["wait"], "body_passes": s["passes"],
                "body_batch_mean": s["samples"] / max(s["passes"], 1)}


class BodyService:
    """Answers the clients' body requests and collects their updates, one attempt at a time."""

    def __init__(self, cfg: Config, body: FrozenBody, transport: Transport, hosts: dict[int, list[int]],
                 event: Callable[[int, str, str], None]) -> None:
        self.body = body
        self.transport = transport
        self.hosts = hosts
        self.host_of = {c: r for r, cs in hosts.items() for c in cs}
        self.event = event
        self.timeout = cfg.comm.client_timeout
        self.server_batch = cfg.comm.server_batch
        self.max_pending = cfg.comm.max_pending

    def serve(self, want: Expected, updates: Updates) -> Attempt:
        """Answer ACTS and GRAD_OUT until every chosen client has sent its UPDATE or left.

        A client leaves when a message of its is refused or when its host rank
        has sent nothing for ``--client-timeout`` seconds while it still owed
        this attempt something; hosts hear a KEEPALIVE every half timeout so
        that an idle host never gives up on a server that is waiting for others.
        """
        now = time.monotonic()
        a = Attempt(want, updates, set(want.chosen), Owing(want.chosen, self.host_of),
                    {rank: now for rank in self.hosts}, now + self.timeout / 2)
        while a.owing:
            msg = self._next(a)
            if msg is not None:
                self._handle(a, msg)
            if self._ready(a):
                self._forward(a)
        return a

    def _ready(self, a: Attempt) -> bool:
        """Whether the pending activations go through the body now: a frozen body batches what has
        arrived (up to ``--server-batch`` clients); a merging body waits for every client still owing."""
        if not a.pending:
            return False
        if self.body.policy == "merge":
            return len(a.pending) >= len(a.owing) and {m.header.client for m in a.pending} >= set(a.owing.ids)
        return self.body.trains or len(a.pending) >= self.server_batch or not self.transport.poll()

    def _next(self, a: Attempt) -> Message | None:
        """The next client message, or None after a wait that ended in a timeout or a KEEPALIVE."""
        missing = a.owing.ids
        # A trained body serves one client at a time, in id order; the others' messages wait in MPI.
        in_turn = self.body.policy == "in_turn"
        source = self.host_of[missing[0]] if in_turn else ANY_SOURCE
        owing = {self.host_of[missing[0]]} if in_turn else a.owing.hosts()
        due = min(min(a.heard[r] for r in owing) + self.timeout, a.next_ping)
        t0 = time.perf_counter()
        msg = None
        try:
            msg = self.transport.recv(source, timeout=max(due - time.monotonic(), 0.0), payload_timeout=self.timeout,
                                      waiting_for=f"round {a.want.round} messages from clients {short(missing)}")
        except PayloadTimeout:
            raise
        except TimeoutError:
            self._drop_silent(a, owing, list(missing))  # a copy: dropping clients settles them
        a.stat["wait"] += time.perf_counter() - t0
        if time.monotonic() >= a.next_ping:  # also while others keep the server busy (a trained body serves in turn)
            for rank in self.hosts:
                self.transport.send(rank, Kind.KEEPALIVE, round=a.want.round, attempt=a.want.attempt)
            a.next_ping = time.monotonic() + self.timeout / 2
        if msg is not None and msg.source in a.heard:
            a.heard[msg.source] = time.monotonic()
        return msg

    def _handle(self, a: Attempt, msg: Message) -> None:
        h = msg.header
        a.client_bytes[h.client] = a.client_bytes.get(h.client, 0) + HEADER_BYTES + h.nbytes
        try:
            kind = check_message(msg, a.want, a.active, a.awaiting)
        except Late as exc:
            log.warning("round %d: discarded %s from rank %d: %s", a.want.round, h.describe(), msg.source, exc)
            self.event(a.want.round, "late", f"rank {msg.source} {h.describe()}: {exc}")
            return
        except ProtocolError as exc:
            self._reject(a, msg, exc)
            return
        if kind == Kind.ACTS:
            a.pending.append(msg)
            a.requests.setdefault(h.client, []).append((h.step, h.shape[0], HEADER_BYTES + h.nbytes, bool(h.aux)))
        elif kind == Kind.GRAD_OUT:
            gid, idx = a.where.pop((h.client, h.step))
            a.groups[gid].grads[idx] = msg.payload
            if len(a.groups[gid].grads) == len(a.groups[gid].members):
                self._backward(a, a.groups.pop(gid))
        elif kind == Kind.UPDATE:
            a.updates.add(h.client, msg.payload, h.aux)
            a.owing.settle(h.client)
            a.update_bytes[h.client] = HEADER_BYTES + h.nbytes

    def _drop_silent(self, a: Attempt, owing: set[int], missing: list[int]) -> None:
        """Drop the clients of every host rank that has been silent for ``--client-timeout`` seconds."""
        now = time.monotonic()
        for rank in sorted(r for r in owing if now - a.heard[r] >= self.timeout):
            gone = [c for c in missing if self.host_of[c] == rank]
            why = f"rank {rank} sent nothing for {self.timeout:g} s (--client-timeout)"
            log.error("round %d: dropped client(s) %s: %s", a.want.round, short(gone), why)
            for cid in gone:
                self.event(a.want.round, "dropped", f"client {cid}: {why}")
                a.timed_out.add(cid)
                self._leave(a, cid, -1)

    def _reject(self, a: Attempt, msg: Message, exc: ProtocolError) -> None:
        """Log a refused message; its client (when known) leaves the attempt and is told so."""
        h = msg.header
        log.error("round %d: rejected %s from rank %d: %s", a.want.round, h.describe(), msg.source, exc)
        self.event(a.want.round, "rejected", f"rank {msg.source} {h.describe()}: {exc}")
        if h.client in a.active and self.host_of.get(h.client) == msg.source:
            self._leave(a, h.client, h.step)

    def _leave(self, a: Attempt, cid: int, step: int) -> None:
        """Client ``cid`` leaves the attempt: its host is told (REJECT), nothing of it is served any more."""
        a.active.discard(cid)
        a.owing.settle(cid)
        self.transport.send(self.host_of[cid], Kind.REJECT, round=a.want.round, attempt=a.want.attempt, client=cid,
                            step=step)
        a.pending[:] = [m for m in a.pending if m.header.client != cid]
        # A batch waiting on this client's gradient goes on without it.
        for key in [k for k in a.where if k[0] == cid]:
            gid, idx = a.where.pop(key)
            group = a.groups[gid]
            group.grads[idx] = torch.zeros(group.members[idx].header.shape)
            if len(group.grads) == len(group.members):
                self._backward(a, a.groups.pop(gid))

    def _forward(self, a: Attempt) -> None:
        """One body pass over the pending activations; their outputs go back to the clients."""
        members, a.pending = a.pending, []
        if self.body.policy == "merge":  # a merged batch in client order, whatever the arrival order
            members.sort(key=lambda m: m.header.client)
        keep = self.body.trains or sum(g.out_BND is not None for g in a.groups.values()) < self.max_pending
        t0 = time.perf_counter()
        acts_BND = from_wire(torch.cat([m.payload for m in members]), self.body.device)
        need_grad = keep and (any(m.header.aux for m in members) or self.body.trains)
        with torch.set_grad_enabled(need_grad):
            leaf_BND = acts_BND.requires_grad_(need_grad)
            out_BND = self.body.forward(leaf_BND)
        offset = 0
        for m in members:
            b = m.header.shape[0]
            self._reply(m, Kind.BODY_OUT, out_BND[offset:offset + b], a.want.wire)
            offset += b
        a.stat["fwd"] += time.perf_counter() - t0
        a.stat["passes"] += 1
        a.stat["samples"] += offset
        if need_grad or any(m.header.aux for m in members):
            for i, m in enumerate(members):
                a.where[(m.header.client, m.header.step)] = (a.next_group, i)
            a.groups[a.next_group] = Group(members, leaf_BND, out_BND if need_grad else None)
            a.next_group += 1

    def _backward(self, a: Attempt, group: Group) -> None:
        """The body's backward for a batch whose gradients are all in; dL/dacts goes back to the clients."""
        t0 = time.perf_counter()
        grad_BND = from_wire(torch.cat([group.grads[i] for i in range(len(group.members))]), self.body.device)
        if group.out_BND is None:  # the graph was not kept: recompute the body's forward
            leaf_BND = group.acts_BND.detach().requires_grad_(True)
            with torch.enable_grad():
                out_BND = self.body.forward(leaf_BND)
        else:
            leaf_BND, out_BND = group.acts_BND, group.out_BND
        g_BND = self.body.backward(out_BND, leaf_BND, grad_BND, [m.header.shape[0] for m in group.members])
        offset = 0
        for m in group.members:
            b = m.header.shape[0]
            if m.header.client in a.active:
                self._reply(m, Kind.GRAD_ACTS, g_BND[offset:offset + b], a.want.wire)
            offset += b
        a.stat["bwd"] += time.perf_counter() - t0

    def _reply(self, m: Message, kind: Kind, piece_BND: torch.Tensor, wire: torch.dtype) -> None:
        """Send a client its slice of a body pass's output or input gradient, answering ``m``."""
        h = m.header
        self.transport.send(m.source, kind, to_wire(piece_BND, wire), round=h.round, attempt=h.attempt,
                            client=h.client, step=h.step)


def short(ids: list[int]) -> str:
    """A list of client ids for a log line: the first 8 and the count."""
    return str(ids) if len(ids) <= 8 else f"{ids[:8]}... ({len(ids)} in all)"
