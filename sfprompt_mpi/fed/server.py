"""The server's round: select, send, serve the body, aggregate, evaluate, checkpoint.

The server holds the full model but trains nothing in SFPrompt: the body is
frozen, so it may serve clients in any order and run several clients'
activations through one body pass (``server_batch``) without changing the
mathematics. Updates are aggregated in client-id order, so the result never
depends on MPI arrival order.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..comm.protocol import HEADER_BYTES, Kind, Message, ProtocolError, Transport, expect, header_for
from ..config import Config
from ..model.split import PromptedViT
from .aggregate import fedavg
from .checkpoint import save_checkpoint
from .client import WIRE_DTYPES, iter_batches, take_batch
from .state import Layout, derive_seed

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """Activations of one or more clients that went through one body pass."""

    members: list[Message]                 # the ACTS messages, in batch order
    acts_BND: torch.Tensor                 # concatenated activations (leaf when a graph is kept)
    out_BND: torch.Tensor | None           # body output with graph, or None (recompute on backward)
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # member index -> dL/dout


def select_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """The K = max(1, round(fraction * N)) clients of round ``rnd``, ascending."""
    k = max(1, round(fraction * num_clients))
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

    # -- whole run -----------------------------------------------------------------
    def run(self, start_round: int = 1) -> None:
        """Rounds ``start_round``..``cfg.fed.rounds``; always tells the hosts to stop."""
        try:
            for rnd in range(start_round, self.cfg.fed.rounds + 1):
                self.run_round(rnd)
        finally:
            for rank in self.hosts:
                self.transport.send(rank, header_for(Kind.STOP, None))

    def run_round(self, rnd: int) -> dict:
        t_round = time.perf_counter()
        selected = select_clients(self.num_clients, self.cfg.fed.fraction, self.cfg.run.seed, rnd)
        global_F = self.layout.flatten(self.global_state)
        for rank, cids in self.hosts.items():
            mine = torch.tensor([c for c in cids if c in set(selected)], dtype=torch.int64)
            self.transport.send(rank, header_for(Kind.START, mine, round=rnd), mine)
            for cid in mine.tolist():
                self.transport.send(rank, header_for(Kind.PARAMS, global_F, round=rnd, client=cid), global_F)
        updates, served = self._serve(rnd, set(selected))
        order = sorted(updates)
        weights = [updates[c][1] for c in order]
        if order:
            self.global_state = fedavg([(self.layout.unflatten(updates[c][0]), updates[c][1]) for c in order])
            self.layout.write(self.model, self.global_state)
        else:
            log.warning("round %d: no client update was accepted; the global model is unchanged", rnd)
        row: dict[str, Any] = {"selected": np.array(order, dtype=np.float64),
                               "agg_weights": np.array(weights, dtype=np.float64) / max(sum(weights), 1)}
        row.update(served)
        row["bytes_recv_per_client"] = np.array([self._client_bytes.get(c, 0) for c in order], dtype=np.float64)
        if rnd % self.cfg.run.eval_every == 0 or rnd == self.cfg.fed.rounds:
            t0 = time.perf_counter()
            acc, loss = self.evaluate()
            row.update(test_acc=acc, test_loss=loss, eval_s=time.perf_counter() - t0)
        if self.run_dir is not None:
            save_checkpoint(f"{self.run_dir}/checkpoint", self.global_state, round=rnd, seed=self.cfg.run.seed)
        counts = self.transport.counter.snapshot_and_reset()
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

    # -- serving the body ------------------------------------------------------------
    def _serve(self, rnd: int, selected: set[int]) -> tuple[dict[int, tuple[torch.Tensor, int]], dict]:
        """Answer ACTS and GRAD_OUT until every selected client has sent its UPDATE."""
        updates: dict[int, tuple[torch.Tensor, int]] = {}
        self._client_bytes: dict[int, int] = {}
        active = set(selected)          # clients still in the round
        pending: list[Message] = []
        groups: dict[int, _Group] = {}
        where: dict[tuple[int, int], tuple[int, int]] = {}  # (client, step) -> (group id, member index)
        stat = {"fwd": 0.0, "bwd": 0.0, "wait": 0.0, "passes": 0, "samples": 0}
        next_gid = 0
        while active - set(updates):
            missing = sorted(active - set(updates))
            t0 = time.perf_counter()
            msg = self.transport.recv(timeout=self.cfg.comm.client_timeout,
                                      waiting_for=f"round {rnd} messages from clients {_short(missing)}")
            stat["wait"] += time.perf_counter() - t0
            h = msg.header
            self._client_bytes[h.client] = self._client_bytes.get(h.client, 0) + HEADER_BYTES + h.nbytes
            try:
                kind = self._check(msg, rnd, active)
            except ProtocolError as exc:
                self._reject(msg, rnd, exc, active, groups, where, stat)
                continue
            if kind == Kind.ACTS:
                pending.append(msg)
            elif kind == Kind.GRAD_OUT:
                gid, idx = where.pop((msg.header.client, msg.header.step))
                groups[gid].grads[idx] = msg.payload
                if len(groups[gid].grads) == len(groups[gid].members):
                    self._backward(groups.pop(gid), active, stat)
            elif kind == Kind.UPDATE:
                updates[msg.header.client] = (msg.payload, msg.header.aux)
            # Batch every activation that has already arrived, up to server_batch clients.
            if pending and (len(pending) >= self.cfg.comm.server_batch or not self.transport.poll()):
                keep = sum(g.out_BND is not None for g in groups.values()) < self.cfg.comm.max_pending
                group = self._forward(pending, keep, stat)
                if any(m.header.aux for m in group.members):
                    for i, m in enumerate(group.members):
                        where[(m.header.client, m.header.step)] = (next_gid, i)
                    groups[next_gid] = group
                    next_gid += 1
                pending = []
        served = {"body_fwd_s": stat["fwd"], "body_bwd_s": stat["bwd"], "queue_wait_s": stat["wait"],
                  "body_passes": stat["passes"],
                  "body_batch_mean": stat["samples"] / max(stat["passes"], 1)}
        return updates, served

    def _reject(self, msg: Message, rnd: int, exc: ProtocolError, active: set[int],
                groups: dict[int, _Group], where: dict, stat: dict) -> None:
        """Log a refused message; its client (when known) leaves the round and is told so."""
        h = msg.header
        log.error("round %d: rejected %s from rank %d: %s", rnd, h.describe(), msg.source, exc)
        if self.metrics is not None:
            self.metrics.event(rnd, "rejected", f"rank {msg.source} {h.describe()}: {exc}")
        if h.client in active and self.host_of.get(h.client) == msg.source:
            active.discard(h.client)
            self.transport.send(msg.source, header_for(Kind.REJECT, None, round=rnd, client=h.client, step=h.step))
            # A batch waiting on this client's gradient goes on without it.
            for key in [k for k in where if k[0] == h.client]:
                gid, idx = where.pop(key)
                group = groups[gid]
                group.grads[idx] = torch.zeros(group.members[idx].header.shape)
                if len(group.grads) == len(group.members):
                    self._backward(groups.pop(gid), active, stat)

    def _check(self, msg: Message, rnd: int, selected: set[int]) -> Kind:
        """Validate a client message against what this round can accept."""
        h = msg.header
        if h.kind == Kind.ERROR:
            raise RuntimeError(f"rank {msg.source} failed during round {rnd}")
        if h.kind not in (Kind.ACTS, Kind.GRAD_OUT, Kind.UPDATE):
            raise ProtocolError(f"unexpected message kind {h.kind.label}")
        if h.round != rnd:
            raise ProtocolError(f"message for round {h.round} during round {rnd}")
        if h.client not in selected or self.host_of.get(h.client) != msg.source:
            raise ProtocolError(f"client {h.client} is not a selected client of rank {msg.source}")
        if h.kind == Kind.UPDATE:
            expect(h, Kind.UPDATE, shape=(self.layout.numel,), dtype=torch.float32)
            if h.aux <= 0:
                raise ProtocolError(f"update with sample count {h.aux}")
        else:
            n, d = self.model.tokens, self.model.width
            if h.shape is None or len(h.shape) != 3 or h.shape[1:] != (n, d) or h.shape[0] < 1:
                raise ProtocolError(f"expected shape (B, {n}, {d})")
            expect(h, h.kind, dtype=self.wire)
        if not bool(torch.isfinite(msg.payload).all()):
            raise ProtocolError("tensor holds NaN or Inf")
        return h.kind

    def _forward(self, members: list[Message], keep_graph: bool, stat: dict) -> _Group:
        t0 = time.perf_counter()
        acts_BND = torch.cat([m.payload for m in members]).to(self.device, torch.float32)
        need_grad = keep_graph and any(m.header.aux for m in members)
        with torch.set_grad_enabled(need_grad):
            leaf = acts_BND.requires_grad_(need_grad)
            out_BND = self.model.body(leaf)
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
                out_BND = self.model.body(leaf)
        else:
            leaf, out_BND = group.acts_BND, group.out_BND
        (g_BND,) = torch.autograd.grad(out_BND, leaf, grad_BND)
        offset = 0
        for m in group.members:
            b = m.header.shape[0]
            if m.header.client in active:
                piece = g_BND[offset:offset + b].detach().to(self.wire)
                self.transport.send(m.source, header_for(Kind.GRAD_ACTS, piece, round=m.header.round,
                                                         client=m.header.client, step=m.header.step), piece)
            offset += b
        stat["bwd"] += time.perf_counter() - t0

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
