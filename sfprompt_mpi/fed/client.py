"""A client host: the rank that hosts one or more virtual clients and answers the server's rounds.

Each client holds its model part (head and tail for split algorithms, the
whole model otherwise), the prompts and its own data shard; what a client
does in a round is its algorithm's (:meth:`~sfprompt_mpi.algorithms.base.Algorithm.client_round`).
The host receives START and each selected client's parameters, runs its
clients in turn and sends each one's UPDATE; the :class:`~.mailbox.Mailbox`
handles the server's control messages.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..algorithms.base import Algorithm, ClientRound
from ..comm.protocol import Kind, Transport, expect, wire_dtype
from ..config import Config
from ..model.split import PromptedViT
from .mailbox import SERVER, Mailbox, Rejected, attempt_of
from .remote import RemoteBody
from .state import Layout, derive_seed
from .training import LocalTrainer

log = logging.getLogger(__name__)


class ClientHost:
    """Hosts the virtual clients of one rank and answers the server's round messages."""

    def __init__(self, cfg: Config, algorithm: Algorithm, model: PromptedViT, layout: Layout, train: Dataset,
                 shards: dict[int, np.ndarray], transport: Transport, metrics: Any = None,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.algorithm = algorithm
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.layout = layout
        self.shards = shards
        self.transport = transport
        self.metrics = metrics
        self.mailbox = Mailbox(transport, cfg.comm.client_timeout)
        params = dict(self.model.named_parameters())
        self.trainer = LocalTrainer(cfg, self.model, [params[n] for n in layout.names], train, self.device)

    def serve(self) -> None:
        """Answer rounds until the server says STOP.

        Every message of a round attempt carries its round and attempt (a
        retry of a round leaves out clients whose host timed out). A client
        the server dropped (REJECT, e.g. after this rank missed
        ``--client-timeout``) is skipped if it has not started yet and
        abandoned where it stands otherwise, so a host that fell behind
        catches up instead of training for nothing.
        """
        while True:
            msg = self.mailbox.recv("the next round (START or STOP)")
            if msg.header.kind == Kind.STOP:
                return
            expect(msg.header, Kind.START)
            rnd, attempt = attempt_of(msg.header)
            self.mailbox.new_attempt(rnd, attempt)
            todo = self._receive_params(rnd, attempt, msg.payload.tolist())
            if self.algorithm.lockstep():
                self._run_lockstep(rnd, attempt, todo)
            else:
                for cid, batch, global_F in todo:
                    self._run_client(rnd, attempt, cid, batch, global_F)
            if self.metrics is not None:
                counts = self.transport.counter.snapshot_and_reset()
                row = {f"bytes_sent/{k}": v for k, v in counts["sent"].items()}
                row.update({f"bytes_recv/{k}": v for k, v in counts["recv"].items()})
                row["peak_mem_mb"] = _peak_mem_mb()
                self.metrics.log(row, rnd)

    def _receive_params(self, rnd: int, attempt: int, cids: list[int]) -> list[tuple[int, int, torch.Tensor]]:
        """(client, batch size, global vector) the server sends each selected client right after START."""
        todo: list[tuple[int, int, torch.Tensor]] = []
        for cid in cids:
            params = self.mailbox.recv(f"round {rnd} parameters for client {cid}")
            idx = self.algorithm.wire_index(rnd, cid)
            held = self.layout.numel if idx is None else idx.numel()
            expect(params.header, Kind.PARAMS, round=rnd, attempt=attempt, client=cid, shape=(held,))
            global_F = params.payload
            if todo and torch.equal(global_F, todo[-1][2]):
                global_F = todo[-1][2]  # clients start from the same global vector: keep one copy, not K
            todo.append((cid, params.header.aux, global_F))
        return todo

    def _run_client(self, rnd: int, attempt: int, cid: int, batch: int, global_F: torch.Tensor) -> None:
        """Train client ``cid`` and send its UPDATE, unless the server dropped it."""
        if self._dropped(rnd, attempt, cid):
            return
        self.mailbox.running = {(rnd, attempt, cid)}
        try:
            flat_F, n, stats = self.run_client_round(rnd, cid, global_F, attempt, batch)
        except Rejected as exc:
            log.warning("round %d: client %d left the round: %s", rnd, cid, exc)
            return
        finally:
            self.mailbox.running = set()
        self._send_update(rnd, attempt, cid, flat_F, n, stats)

    def _dropped(self, rnd: int, attempt: int, cid: int) -> bool:
        """Whether the server dropped client ``cid`` before it started (its REJECT already here); logged."""
        self.mailbox.drain()
        if self.mailbox.dropped(rnd, attempt, cid):
            log.warning("round %d: client %d was dropped by the server before it started; skipped", rnd, cid)
            return True
        return False

    def _run_lockstep(self, rnd: int, attempt: int, todo: list[tuple[int, int, torch.Tensor]]) -> None:
        """Train this host's selected clients together, one step of each in turn (the algorithm's
        :meth:`~sfprompt_mpi.algorithms.base.Algorithm.client_rounds`), each on its own copy of the model."""
        ctxs = {}
        for cid, batch, global_F in todo:
            if self._dropped(rnd, attempt, cid):
                continue
            model = copy.deepcopy(self.model)
            params = dict(model.named_parameters())
            trainer = LocalTrainer(self.cfg, model, [params[n] for n in self.layout.names], self.trainer.dataset,
                                   self.device)
            ctxs[cid] = self._context(rnd, attempt, cid, batch, global_F, trainer)
        self.mailbox.running = {(rnd, attempt, cid) for cid in ctxs}
        try:
            results = self.algorithm.client_rounds(ctxs)
        finally:
            self.mailbox.running = set()
        for cid, stats in results.items():
            ctx = ctxs[cid]
            weight = self.algorithm.aggregation_weight(len(ctx.shard), ctx.settings)
            self._send_update(rnd, attempt, cid, self._held_part(rnd, cid, ctx.model), weight, stats)

    def _send_update(self, rnd: int, attempt: int, cid: int, flat_F: torch.Tensor, weight: int, stats: dict) -> None:
        if attempt:
            stats["attempt"] = attempt
        t0 = time.perf_counter()
        self.transport.send(SERVER, Kind.UPDATE, flat_F, round=rnd, attempt=attempt, client=cid, aux=weight)
        stats["time/upload"] = time.perf_counter() - t0
        if self.metrics is not None:
            # flushed with the round's own row: one flush per round, not per client
            self.metrics.log({f"clients/{cid}/{k}": v for k, v in stats.items()}, rnd, flush=False)

    def run_client_round(self, rnd: int, cid: int, global_F: torch.Tensor, attempt: int = 0,
                         batch: int = 0) -> tuple[torch.Tensor, int, dict]:
        """Train client ``cid`` from the global vector (the part it holds; ``batch``: the batch size the server
        gave it, 0: its settings'); -> (its trained part, aggregation weight, stats)."""
        ctx = self._context(rnd, attempt, cid, batch, global_F, self.trainer)
        stats = self.algorithm.client_round(ctx)
        weight = self.algorithm.aggregation_weight(len(ctx.shard), ctx.settings)
        return self._held_part(rnd, cid, ctx.model), weight, stats

    def _held_part(self, rnd: int, cid: int, model: PromptedViT) -> torch.Tensor:
        """The trained vector of ``model``, the part client ``cid`` holds."""
        idx = self.algorithm.wire_index(rnd, cid)
        flat_F = self.layout.flatten_model(model)
        return flat_F if idx is None else flat_F[idx]

    def _context(self, rnd: int, attempt: int, cid: int, batch: int, global_F: torch.Tensor,
                 trainer: LocalTrainer) -> ClientRound:
        """Client ``cid``'s round on ``trainer``'s model, loaded with the global vector (the part it holds;
        the positions it does not hold are zero on its side)."""
        idx = self.algorithm.wire_index(rnd, cid)
        if idx is not None:
            full_F = torch.zeros(self.layout.numel, dtype=torch.float32)
            full_F[idx] = global_F
            global_F = full_F
        self.layout.load(trainer.model, global_F)
        algo = self.algorithm
        remote = None
        if algo.split:
            remote = RemoteBody(self.mailbox, rnd, attempt, cid, wire=wire_dtype(self.cfg.comm.wire_dtype),
                                device=self.device)
        settings = algo.client_settings(rnd, cid)
        if batch:
            settings = dataclasses.replace(settings, batch_size=batch)
        seed = derive_seed(self.cfg.run.seed, rnd, cid, *([attempt] if attempt else []))  # a retry draws anew
        return ClientRound(trainer.model, self.shards[cid], settings, trainer, torch.Generator().manual_seed(seed),
                           remote, rnd, cid)


def _peak_mem_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
