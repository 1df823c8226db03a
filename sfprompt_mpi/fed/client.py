"""A client host: the rank that hosts one or more virtual clients and answers the server's rounds.

Each client holds its model part (head and tail for split algorithms, the
whole model otherwise), the prompts and its own data shard; what a client
does in a round is its algorithm's (:meth:`~sfprompt_mpi.algorithms.base.Algorithm.client_round`).
The host receives START and each selected client's parameters, runs its
clients in turn and sends each one's UPDATE; the :class:`~.mailbox.Mailbox`
handles the server's control messages.
"""

from __future__ import annotations

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
            for cid, global_F in self._receive_params(rnd, attempt, msg.payload.tolist()):
                self._run_client(rnd, attempt, cid, global_F)
            if self.metrics is not None:
                counts = self.transport.counter.snapshot_and_reset()
                row = {f"bytes_sent/{k}": v for k, v in counts["sent"].items()}
                row.update({f"bytes_recv/{k}": v for k, v in counts["recv"].items()})
                row["peak_mem_mb"] = _peak_mem_mb()
                self.metrics.log(row, rnd)

    def _receive_params(self, rnd: int, attempt: int, cids: list[int]) -> list[tuple[int, torch.Tensor]]:
        """The global vector the server sends each selected client right after START."""
        todo: list[tuple[int, torch.Tensor]] = []
        for cid in cids:
            params = self.mailbox.recv(f"round {rnd} parameters for client {cid}")
            expect(params.header, Kind.PARAMS, round=rnd, attempt=attempt, client=cid, shape=(self.layout.numel,))
            global_F = params.payload
            if todo and torch.equal(global_F, todo[-1][1]):
                global_F = todo[-1][1]  # clients start from the same global vector: keep one copy, not K
            todo.append((cid, global_F))
        return todo

    def _run_client(self, rnd: int, attempt: int, cid: int, global_F: torch.Tensor) -> None:
        """Train client ``cid`` and send its UPDATE, unless the server dropped it."""
        self.mailbox.drain()
        if self.mailbox.dropped(rnd, attempt, cid):
            log.warning("round %d: client %d was dropped by the server before it started; skipped", rnd, cid)
            return
        self.mailbox.current = (rnd, attempt, cid)
        try:
            flat_F, n, stats = self.run_client_round(rnd, cid, global_F, attempt)
        except Rejected as exc:
            log.warning("round %d: client %d left the round: %s", rnd, cid, exc)
            return
        finally:
            self.mailbox.current = None
        if attempt:
            stats["attempt"] = attempt
        t0 = time.perf_counter()
        self.transport.send(SERVER, Kind.UPDATE, flat_F, round=rnd, attempt=attempt, client=cid, aux=n)
        stats["time/upload"] = time.perf_counter() - t0
        if self.metrics is not None:
            # flushed with the round's own row: one flush per round, not per client
            self.metrics.log({f"clients/{cid}/{k}": v for k, v in stats.items()}, rnd, flush=False)

    def run_client_round(self, rnd: int, cid: int, global_F: torch.Tensor,
                         attempt: int = 0) -> tuple[torch.Tensor, int, dict]:
        """Train client ``cid`` from the global vector; -> (trained vector, sample count, stats)."""
        self.layout.write(self.model, self.layout.unflatten(global_F))
        shard = self.shards[cid]
        algo = self.algorithm
        remote = None
        if algo.split:
            remote = RemoteBody(self.mailbox, rnd, attempt, cid, wire=wire_dtype(self.cfg.comm.wire_dtype),
                                device=self.device)
        seed = derive_seed(self.cfg.run.seed, rnd, cid, *([attempt] if attempt else []))  # a retry draws anew
        ctx = ClientRound(self.model, shard, algo.client_settings(rnd, cid), self.trainer,
                          torch.Generator().manual_seed(seed), remote)
        stats = algo.client_round(ctx)
        return self.layout.flatten_model(self.model), len(shard), stats


def _peak_mem_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
