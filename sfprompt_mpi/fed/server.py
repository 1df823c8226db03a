"""The server's round: select, send, serve the body, aggregate, evaluate, checkpoint.

The server holds the full model but trains nothing in SFPrompt: the body is
frozen, so it may serve clients in any order and run several clients'
activations through one body pass (``server_batch``) without changing the
mathematics. FedAvg sums updates exactly as they arrive (one accumulator, not
K vectors); the other aggregators take them in client-id order. Either way
the result never depends on MPI arrival order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..comm.protocol import (ANY_SOURCE, HEADER_BYTES, ROUND_ATTEMPT_STRIDE, Kind, Message, PayloadTimeout, ProtocolError,
                              Transport, expect, header_for, round_of, round_tag)
from ..config import Config, clients_per_round
from ..errors import RunStopped
from ..model.split import PromptedViT
from .aggregate import MAX_WEIGHT, Updates, aggregate
from .dp import dp_epsilon, dp_fedavg
from .checkpoint import save_checkpoint
from .client import WIRE_DTYPES, iter_batches, make_optimizer, take_batch
from .state import Layout, derive_seed, server_trained_names

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """Activations of one or more clients that went through one body pass."""

    members: list[Message]                 # the ACTS messages, in batch order
    acts_BND: torch.Tensor                 # concatenated activations (leaf when a graph is kept)
    out_BND: torch.Tensor | None           # body output with graph, or None (recompute on backward)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # member index -> dL/dout


class _Late(ProtocolError):
    """A message from an earlier round or attempt, or from a client that already left: discarded, no penalty."""


def _attempt_key(tag: int) -> tuple[int, int]:
    return round_of(tag), tag // ROUND_ATTEMPT_STRIDE


def select_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """The K = max(1, round(fraction * N)) clients of round ``rnd``, ascending."""
    k = clients_per_round(num_clients, fraction)
    rng = np.random.default_rng(derive_seed(seed, rnd, 0x5E1EC7))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


class Server:
    """Rank 0: drives rounds over the client hosts of ``hosts`` (rank -> client ids)."""

    def __init__(self, cfg: Config, model: PromptedViT, layout: Layout, test: Dataset,
                 hosts: dict[int, list[int]], transport: Transport, *, device: torch.device | str = "cpu",
                 metrics: Any = None, run_dir: str | None = None,
                 on_round: Callable[[int, dict], None] | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.eval()
        self.layout = layout
        self.test = test
        self.hosts = hosts
        self.host_of = {c: r for r, cs in hosts.items() for c in cs}
        self.num_clients = len(self.host_of)
        self.transport = transport
        self.metrics = metrics
        self.run_dir = run_dir
        self.on_round = on_round
        self.wire = WIRE_DTYPES[cfg.comm.wire_dtype]
        self.global_state = layout.read(model)
        self.history: list[dict] = []
        # sfl-full: the server trains the body itself, one client step at a time, in client-id order.
        self.body_names = server_trained_names(model, cfg)
        params = dict(self.model.named_parameters())
        self._body_params = [params[n].requires_grad_(True) for n in self.body_names]
        self.body_opt = make_optimizer(self._body_params, cfg, cfg.fed.lr) if self._body_params else None
        self.sequential = self.body_opt is not None
        self.body_bf16 = cfg.comm.server_dtype == "bfloat16"
        self._started: tuple[int, list[int], torch.Tensor, float] | None = None  # round, selected, global_F, t0

    # -- whole run -----------------------------------------------------------------
    def run(self, start_round: int = 1) -> None:
        """Rounds ``start_round``..``cfg.fed.rounds``; always tells the hosts to stop.

        Each round but the last starts the next one before its own evaluation,
        checkpoint and metrics: the clients begin training (SFPrompt's local
        phase needs no server) while the server evaluates.
        """
        last = self.cfg.fed.rounds
        try:
            for rnd in range(start_round, last + 1):
                self.run_round(rnd, start_next=rnd < last)
        finally:
            for rank in self.hosts:
                self.transport.send(rank, header_for(Kind.STOP, None))

    def run_round(self, rnd: int, *, start_next: bool = False) -> dict:
        """Round ``rnd`` (started here unless the round before started it); with
        ``start_next`` round ``rnd + 1`` is started before this one's evaluation."""
        if self._started is None or self._started[0] != rnd:
            self._start(rnd)
        _, selected, global_F, t_round = self._started
        updates, served, dropped = self._attempts(rnd, selected, global_F)
        order = updates.ids()
        weights = [updates.counts[c] for c in order]
        new_F, agg_stats = self._aggregate(rnd, global_F, updates, len(selected))
        self.global_state = self.layout.unflatten(new_F)
        self.layout.write(self.model, self.global_state)
        counts = self.transport.counter.snapshot_and_reset()  # before the next round's messages
        if start_next:
            self._start(rnd + 1)
        row: dict[str, Any] = {"selected": np.array(order, dtype=np.float64),
                               "agg_weights": np.array(weights, dtype=np.float64) / max(sum(weights), 1),
                               "clients_dropped": float(len(dropped)), **agg_stats}
        row.update(served)
        row["bytes_recv_per_client"] = np.array([self._client_bytes.get(c, 0) for c in order], dtype=np.float64)
        if rnd % self.cfg.run.eval_every == 0 or rnd == self.cfg.fed.rounds:
            t0 = time.perf_counter()
            acc, loss = self.evaluate()
            row.update(test_acc=acc, test_loss=loss, eval_s=time.perf_counter() - t0)
        if self.run_dir is not None:
            save_checkpoint(f"{self.run_dir}/checkpoint", self.checkpoint_state(), round=rnd, seed=self.cfg.run.seed)
        row.update({f"bytes_sent/{k}": v for k, v in counts["sent"].items()})
        row.update({f"bytes_recv/{k}": v for k, v in counts["recv"].items()})
        row["round_s"] = time.perf_counter() - t_round
        row["server_busy_frac"] = (served["body_fwd_s"] + served["body_bwd_s"]) / max(row["round_s"], 1e-9)
        if self.metrics is not None:
            self.metrics.log(row, rnd)
        self.history.append({"round": rnd, **row})
        if self.on_round is not None:
            self.on_round(rnd, row)
        return row

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the global client-trained state, plus the body when the server trains it."""
        params = dict(self.model.named_parameters())
        return {**self.global_state, **{n: params[n].detach().to("cpu").clone() for n in self.body_names}}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`checkpoint_state` (for --resume)."""
        self.global_state = {n: tensors[n] for n in self.layout.names}
        self.layout.write(self.model, self.global_state)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.body_names:
                params[n].copy_(tensors[n])

    # -- attempts, aggregation ---------------------------------------------------------
    def _attempts(self, rnd: int, selected: list[int], global_F: torch.Tensor) -> tuple[Updates, dict, set[int]]:
        """Run round ``rnd`` until at least ``--min-clients`` clients survive it.

        A retry (at most ``--round-retries``) leaves out the clients whose host
        timed out (it is still busy with the failed attempt) and tags its
        messages with a new attempt number, so nothing from the failed attempt
        is mistaken for the retry's. -> (updates, serving stats, dropped clients).
        """
        comm = self.cfg.comm
        excluded: set[int] = set()
        for attempt in range(comm.round_retries + 1):
            tag = round_tag(rnd, attempt)
            chosen = [c for c in selected if c not in excluded]
            if attempt:  # the first attempt was started by _start
                self._send_start(tag, chosen, global_F)
            updates, served = self._serve(tag, set(chosen))
            dropped = set(selected) - updates.counts.keys()
            if len(updates) >= comm.min_clients:
                return updates, served, dropped
            excluded |= self._timed_out
            why = (f"round {rnd}: {len(updates)} of {len(selected)} selected clients survived "
                   f"(--min-clients {comm.min_clients}; dropped: {_short(sorted(dropped))})")
            if attempt < comm.round_retries:
                log.warning("%s; retry %d of %d", why, attempt + 1, comm.round_retries)
                self._event(rnd, "retry", f"{why}; retry {attempt + 1} of {comm.round_retries}")
                continue
            self._event(rnd, "stopped", why)
            raise RunStopped(f"{why} after {comm.round_retries} retries (--round-retries); the global model of "
                             f"round {rnd - 1} is in the checkpoint: fix the failing clients or lower "
                             f"--min-clients, then continue with --resume {self.run_dir or 'RUN_DIR'}")
        raise AssertionError("unreachable")

    def _start(self, rnd: int) -> None:
        """Send round ``rnd``'s START and parameters (its first attempt) to every host."""
        t_round = time.perf_counter()
        selected = select_clients(self.num_clients, self.cfg.fed.fraction, self.cfg.run.seed, rnd)
        global_F = self.layout.flatten(self.global_state)
        self._send_start(round_tag(rnd, 0), selected, global_F)
        self._started = (rnd, selected, global_F, t_round)

    def _send_start(self, tag: int, chosen: list[int], global_F: torch.Tensor) -> None:
        chosen_set = set(chosen)
        for rank, cids in self.hosts.items():
            mine = torch.tensor([c for c in cids if c in chosen_set], dtype=torch.int64)
            self.transport.send(rank, header_for(Kind.START, mine, round=tag), mine)
            for cid in mine.tolist():
                self.transport.send(rank, header_for(Kind.PARAMS, global_F, round=tag, client=cid), global_F)

    def _streams(self) -> bool:
        """Whether updates are summed on arrival (plain FedAvg) rather than kept until the end."""
        return self.cfg.fed.aggregator == "fedavg" and self.cfg.fed.dp_clip <= 0

    def _aggregate(self, rnd: int, global_F: torch.Tensor, updates: Updates,
                   selected: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The new global vector from the surviving updates by ``--aggregator``, or DP-FedAvg."""
        fed = self.cfg.fed
        if updates.sum is not None:
            return updates.sum.mean(), {}
        updates = updates.in_order()
        if fed.dp_clip > 0:
            new_F, stats = dp_fedavg(global_F, [u for u, _ in updates], clip=fed.dp_clip, noise=fed.dp_noise,
                                     selected=selected, seed=self.cfg.run.seed, rnd=rnd)
            stats["dp_epsilon"] = dp_epsilon(rnd, noise=fed.dp_noise, sample_rate=selected / self.num_clients,
                                             delta=fed.dp_delta)
            return new_F, stats
        return aggregate(fed.aggregator, global_F, updates, trim=fed.trim_fraction, clip=fed.clip_norm)

    def _event(self, rnd: int, kind: str, text: str) -> None:
        if self.metrics is not None:
            self.metrics.event(rnd, kind, text)

    # -- serving the body ------------------------------------------------------------
    def _serve(self, tag: int, selected: set[int]) -> tuple[Updates, dict]:
        """Answer ACTS and GRAD_OUT until every selected client has sent its UPDATE or left.

        ``tag``: the header round field of this attempt (:func:`round_tag`).
        A client leaves when a message of its is refused (:meth:`_check`) or
        when its host rank has sent nothing for ``--client-timeout`` seconds
        while it still owed this round something; hosts hear a KEEPALIVE every
        half timeout so that an idle host never gives up on a server that is
        waiting for others.
        """
        rnd = round_of(tag)
        updates = Updates(self.layout.numel, streaming=self._streams())
        self._client_bytes: dict[int, int] = {}
        self._chosen = set(selected)
        self._timed_out: set[int] = set()
        active = set(selected)          # clients still in the round
        pending: list[Message] = []
        groups: dict[int, _Group] = {}
        where: dict[tuple[int, int], tuple[int, int]] = {}  # (client, step) -> (group id, member index)
        stat = {"fwd": 0.0, "bwd": 0.0, "wait": 0.0, "passes": 0, "samples": 0}
        next_gid = 0
        limit = self.cfg.comm.client_timeout
        heard = {rank: time.monotonic() for rank in self.hosts}  # last message from each host rank
        next_ping = time.monotonic() + limit / 2
        while active - updates.counts.keys():
            missing = sorted(active - updates.counts.keys())
            # sfl-full trains the body: serve one client at a time, in id order; the others' messages wait in MPI.
            owing = {self.host_of[missing[0]]} if self.sequential else {self.host_of[c] for c in missing}
            due = min(min(heard[r] for r in owing) + limit, next_ping)
            t0 = time.perf_counter()
            try:
                msg = self.transport.recv(self.host_of[missing[0]] if self.sequential else ANY_SOURCE,
                                          timeout=max(due - time.monotonic(), 0.0), payload_timeout=limit,
                                          waiting_for=f"round {rnd} messages from clients {_short(missing)}")
            except PayloadTimeout:
                raise
            except TimeoutError:
                msg = None
                self._on_timeout(tag, owing, heard, missing, active, pending, groups, where, stat)
            stat["wait"] += time.perf_counter() - t0
            if time.monotonic() >= next_ping:  # also while others keep the server busy (sfl-full serves in turn)
                for rank in self.hosts:
                    self.transport.send(rank, header_for(Kind.KEEPALIVE, None, round=tag))
                next_ping = time.monotonic() + limit / 2
            if msg is None:
                continue
            if msg.source in heard:
                heard[msg.source] = time.monotonic()
            h = msg.header
            self._client_bytes[h.client] = self._client_bytes.get(h.client, 0) + HEADER_BYTES + h.nbytes
            try:
                kind = self._check(msg, tag, active, where, groups)
            except _Late as exc:
                log.warning("round %d: discarded %s from rank %d: %s", rnd, h.describe(), msg.source, exc)
                self._event(rnd, "late", f"rank {msg.source} {h.describe()}: {exc}")
                continue
            except ProtocolError as exc:
                self._reject(msg, tag, exc, active, groups, where, stat, pending)
                continue
            if kind == Kind.ACTS:
                pending.append(msg)
            elif kind == Kind.GRAD_OUT:
                gid, idx = where.pop((msg.header.client, msg.header.step))
                groups[gid].grads[idx] = msg.payload
                if len(groups[gid].grads) == len(groups[gid].members):
                    self._backward(groups.pop(gid), active, stat)
            elif kind == Kind.UPDATE:
                updates.add(msg.header.client, msg.payload, msg.header.aux)
            # Batch every activation that has already arrived, up to server_batch clients.
            if pending and (self.sequential or len(pending) >= self.cfg.comm.server_batch
                            or not self.transport.poll()):
                keep = self.sequential or sum(g.out_BND is not None for g in groups.values()) < self.cfg.comm.max_pending
                group = self._forward(pending, keep, stat)
                if group.out_BND is not None or any(m.header.aux for m in group.members):
                    for i, m in enumerate(group.members):
                        where[(m.header.client, m.header.step)] = (next_gid, i)
                    groups[next_gid] = group
                    next_gid += 1
                pending = []
        served = {"body_fwd_s": stat["fwd"], "body_bwd_s": stat["bwd"], "queue_wait_s": stat["wait"],
                  "body_passes": stat["passes"],
                  "body_batch_mean": stat["samples"] / max(stat["passes"], 1)}
        return updates, served

    def _on_timeout(self, tag: int, owing: set[int], heard: dict[int, float], missing: list[int],
                    active: set[int], pending: list[Message], groups: dict[int, _Group], where: dict,
                    stat: dict) -> None:
        """Drop the clients of every host rank that has been silent for ``--client-timeout`` seconds."""
        rnd, limit, now = round_of(tag), self.cfg.comm.client_timeout, time.monotonic()
        for rank in sorted(r for r in owing if now - heard[r] >= limit):
            gone = [c for c in missing if self.host_of[c] == rank]
            why = f"rank {rank} sent nothing for {limit:g} s (--client-timeout)"
            log.error("round %d: dropped client(s) %s: %s", rnd, _short(gone), why)
            for cid in gone:
                self._event(rnd, "dropped", f"client {cid}: {why}")
                self._timed_out.add(cid)
                self._leave(cid, tag, -1, active, groups, where, stat, pending)

    def _reject(self, msg: Message, tag: int, exc: ProtocolError, active: set[int],
                groups: dict[int, _Group], where: dict, stat: dict, pending: list[Message] | None = None) -> None:
        """Log a refused message; its client (when known) leaves the round and is told so."""
        h, rnd = msg.header, round_of(tag)
        log.error("round %d: rejected %s from rank %d: %s", rnd, h.describe(), msg.source, exc)
        self._event(rnd, "rejected", f"rank {msg.source} {h.describe()}: {exc}")
        if h.client in active and self.host_of.get(h.client) == msg.source:
            self._leave(h.client, tag, h.step, active, groups, where, stat, pending)

    def _leave(self, cid: int, tag: int, step: int, active: set[int], groups: dict[int, _Group], where: dict,
               stat: dict, pending: list[Message] | None) -> None:
        """Client ``cid`` leaves the round: its host is told (REJECT), nothing of it is served any more."""
        active.discard(cid)
        self.transport.send(self.host_of[cid], header_for(Kind.REJECT, None, round=tag, client=cid, step=step))
        if pending is not None:
            pending[:] = [m for m in pending if m.header.client != cid]
        # A batch waiting on this client's gradient goes on without it.
        for key in [k for k in where if k[0] == cid]:
            gid, idx = where.pop(key)
            group = groups[gid]
            group.grads[idx] = torch.zeros(group.members[idx].header.shape)
            if len(group.grads) == len(group.members):
                self._backward(groups.pop(gid), active, stat)

    def _check(self, msg: Message, tag: int, selected: set[int], where: dict | None = None,
               groups: dict[int, _Group] | None = None) -> Kind:
        """Validate a client message against what this round attempt (``tag``) can accept.

        Checks kind, round, client/rank pairing, shape (the size limit: a
        batch of at most ``--batch-size`` samples, or exactly the trainable
        vector), dtype, the gradient's match with the activations it answers,
        and finiteness. Raises :class:`_Late` for a straggler's message of an
        earlier round or attempt (or of a client that already left), which is
        discarded without penalty, and ProtocolError for anything malformed.
        """
        h, rnd = msg.header, round_of(tag)
        if h.kind == Kind.ERROR:
            raise RuntimeError(f"rank {msg.source} failed during round {rnd}")
        if h.kind not in (Kind.ACTS, Kind.GRAD_OUT, Kind.UPDATE):
            raise ProtocolError(f"unexpected message kind {h.kind.label}")
        if h.round != tag:
            if _attempt_key(h.round) < _attempt_key(tag):
                attempt = h.round // ROUND_ATTEMPT_STRIDE
                raise _Late(f"late message of round {round_of(h.round)}" + (f" attempt {attempt}" if attempt else ""))
            raise ProtocolError(f"message for round {round_of(h.round)} during round {rnd}")
        if self.host_of.get(h.client) != msg.source:
            raise ProtocolError(f"client {h.client} is not a client of rank {msg.source}")
        if h.client not in selected:
            if h.client in getattr(self, "_chosen", set()):
                raise _Late(f"client {h.client} already left round {rnd}")
            raise ProtocolError(f"client {h.client} is not selected in round {rnd}")
        if h.kind == Kind.UPDATE:
            expect(h, Kind.UPDATE, shape=(self.layout.numel,), dtype=torch.float32)
            if not 1 <= h.aux <= MAX_WEIGHT:
                raise ProtocolError(f"update with sample count {h.aux} (must be 1..{MAX_WEIGHT})")
        else:
            n, d = self.model.tokens, self.model.width
            if h.shape is None or len(h.shape) != 3 or h.shape[1:] != (n, d) or h.shape[0] < 1:
                raise ProtocolError(f"expected shape (B, {n}, {d})")
            if h.shape[0] > self.cfg.fed.batch_size:
                raise ProtocolError(f"batch of {h.shape[0]} exceeds --batch-size {self.cfg.fed.batch_size}")
            expect(h, h.kind, dtype=self.wire)
            if h.kind == Kind.GRAD_OUT and where is not None and groups is not None:
                if (h.client, h.step) not in where:
                    raise ProtocolError(f"gradient for step {h.step}, which has no body output awaiting it")
                gid, idx = where[(h.client, h.step)]
                if groups[gid].members[idx].header.shape != h.shape:
                    raise ProtocolError(f"gradient shape differs from step {h.step}'s activations "
                                        f"{groups[gid].members[idx].header.shape}")
        if not bool(torch.isfinite(msg.payload).all()):
            raise ProtocolError("tensor holds NaN or Inf")
        return h.kind

    def _forward(self, members: list[Message], keep_graph: bool, stat: dict) -> _Group:
        t0 = time.perf_counter()
        acts_BND = torch.cat([m.payload for m in members]).to(self.device, torch.float32)
        need_grad = keep_graph and (any(m.header.aux for m in members) or self.body_opt is not None)
        with torch.set_grad_enabled(need_grad):
            leaf = acts_BND.requires_grad_(need_grad)
            out_BND = self._body(leaf)
        offset = 0
        for m in members:
            b = m.header.shape[0]
            piece = out_BND[offset:offset + b].detach().to(self.wire)
            self.transport.send(m.source, header_for(Kind.BODY_OUT, piece, round=m.header.round,
                                                     client=m.header.client, step=m.header.step), piece)
            offset += b
        stat["fwd"] += time.perf_counter() - t0
        stat["passes"] += 1
        stat["samples"] += offset
        return _Group(members, leaf, out_BND if need_grad else None)

    def _backward(self, group: _Group, active: set[int], stat: dict) -> None:
        t0 = time.perf_counter()
        grad_BND = torch.cat([group.grads[i] for i in range(len(group.members))]).to(self.device, torch.float32)
        if group.out_BND is None:  # graph was not kept: recompute the frozen body's forward
            leaf = group.acts_BND.detach().requires_grad_(True)
            with torch.enable_grad():
                out_BND = self._body(leaf)
        else:
            leaf, out_BND = group.acts_BND, group.out_BND
        g_BND = self._body_backward(out_BND, leaf, grad_BND)
        offset = 0
        for m in group.members:
            b = m.header.shape[0]
            if m.header.client in active:
                piece = g_BND[offset:offset + b].detach().to(self.wire)
                self.transport.send(m.source, header_for(Kind.GRAD_ACTS, piece, round=m.header.round,
                                                         client=m.header.client, step=m.header.step), piece)
            offset += b
        stat["bwd"] += time.perf_counter() - t0

    def _body(self, acts_BND: torch.Tensor) -> torch.Tensor:
        """The body's forward, under bfloat16 autocast when ``--server-dtype bfloat16``.

        Weights stay float32; matrix products run in bfloat16 (the inputs'
        gradient comes back in float32, the leaf's dtype)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.body_bf16):
            return self.model.body(acts_BND)

    def _body_backward(self, out_BND: torch.Tensor, leaf: torch.Tensor, grad_BND: torch.Tensor) -> torch.Tensor:
        """dL/dacts for the clients; with a server-trained body (sfl-full) also one optimiser
        step on the body, taken after the clients' gradient was computed with the old weights."""
        grad_BND = grad_BND.to(out_BND.dtype)
        if self.body_opt is None:
            (g_BND,) = torch.autograd.grad(out_BND, leaf, grad_BND)
            return g_BND
        grads = torch.autograd.grad(out_BND, [leaf, *self._body_params], grad_BND)
        for p, g in zip(self._body_params, grads[1:]):
            p.grad = g
        self.body_opt.step()
        self.body_opt.zero_grad(set_to_none=True)
        return grads[0]

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Accuracy and mean loss of the full model with the global prompts and tail."""
        self.model.eval()
        n = len(self.test)
        correct, total = 0, 0.0
        for pos in iter_batches(n, 256, None):
            images, labels = take_batch(self.test, pos)
            logits_BK = self.model(images.to(self.device)).float()
            labels = labels.to(self.device)
            total += float(F.cross_entropy(logits_BK, labels, reduction="sum"))
            correct += int((logits_BK.argmax(-1) == labels).sum())
        return correct / max(n, 1), total / max(n, 1)


def _short(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 8 else f"{ids[:8]}... ({len(ids)} in all)"
