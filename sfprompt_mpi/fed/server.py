"""The server's round driver: select, start, retries, aggregate, evaluate, checkpoint, metrics.

The server holds the full model. Serving the clients' body requests during
an attempt is the :class:`~.serving.BodyService`'s; what the body does with
activations and how updates are combined is the algorithm's. FedAvg sums
updates exactly as they arrive (one accumulator, not K vectors); the other
aggregators take them in client-id order. Either way the result never
depends on MPI arrival order.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..algorithms import build_algorithm
from ..algorithms.base import Algorithm, ClientsView
from ..comm.protocol import HEADER_BYTES, Kind, Transport, wire_dtype
from ..config import Config
from ..devices import from_record
from ..errors import RunStopped
from ..model.split import PromptedViT
from ..simclock import SimClock, round_row
from ..stopping import Stopper
from .aggregate import Updates
from .checkpoint import save_checkpoint
from .checks import Expected
from .serving import Attempt, BodyService, short
from .state import Layout
from .training import iter_batches, take_batch

log = logging.getLogger(__name__)


def sim_clock(cfg: Config, algorithm: Algorithm, model: PromptedViT, numel: int, num_clients: int,
              policy: str) -> SimClock | None:
    """The run's simulated clock, from the device profiles it resolved (``cfg.devices``), or None."""
    if cfg.devices is None:
        return None
    from ..estimate import run_pass_flops
    return SimClock(from_record(cfg.devices, num_clients), algorithm, run_pass_flops(cfg, model.vit.num_classes),
                    numel=numel, policy=policy)


class Server:
    """Rank 0: drives rounds over the client hosts of ``hosts`` (rank -> client ids)."""

    def __init__(self, cfg: Config, model: PromptedViT, layout: Layout, test: Dataset,
                 hosts: dict[int, list[int]], transport: Transport, *, algorithm: Algorithm | None = None,
                 device: torch.device | str = "cpu", metrics: Any = None, run_dir: str | None = None,
                 on_round: Callable[[int, dict], None] | None = None, stopper: Stopper | None = None,
                 label_counts: np.ndarray | None = None) -> None:
        self.cfg = cfg
        self.algorithm = algorithm or build_algorithm(cfg)
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
        self.global_state = layout.read(model)
        self.history: list[dict] = []
        self.body_names = self.algorithm.server_trained_names(self.model)
        self.service = BodyService(cfg, self.algorithm.server_body(self.model, self.device), transport, hosts,
                                   self._event)
        #: The simulated clock of ``--devices`` (None for 'none'): what each round would take on the devices.
        self.clock = sim_clock(cfg, self.algorithm, model, layout.numel, self.num_clients, self.service.body.policy)
        #: Each client's sample count (from its label histogram), else the clock takes the update's weight.
        self.shard_sizes = None if label_counts is None else label_counts.sum(1)
        wire = wire_dtype(cfg.comm.wire_dtype).itemsize
        self.algorithm.observe_clients(ClientsView(label_counts, self.clock and self.clock.devices,
                                                   self.clock and self.clock.f, model.tokens * model.width * wire))
        #: The round started last: (round, selected clients, its global vector, when it started).
        self.started: tuple[int, list[int], torch.Tensor, float] | None = None
        #: Asked before each round starts whether to stop instead (a signal, the time budget).
        self.stopper = stopper or Stopper()
        #: (last completed round, why) when the run stopped early to be continued, else None.
        self.stopped: tuple[int, str] | None = None

    # -- whole run -----------------------------------------------------------------
    def run(self, start_round: int = 1) -> None:
        """Rounds ``start_round``..``cfg.fed.rounds``; always tells the hosts to stop.

        Each round but the last starts the next one before its own evaluation,
        checkpoint and metrics: the clients begin training (SFPrompt's local
        phase needs no server) while the server evaluates.
        """
        last = self.cfg.fed.rounds
        try:
            why = self._stop_before(start_round) if start_round <= last else None
            if why is not None:
                self.stopped = (start_round - 1, why)
            for rnd in range(start_round, last + 1 if why is None else start_round):
                self.run_round(rnd, start_next=rnd < last)
                if self.stopped is not None:
                    break
        finally:
            for rank in self.hosts:
                self.transport.send(rank, Kind.STOP)

    def run_round(self, rnd: int, *, start_next: bool = False) -> dict:
        """Round ``rnd`` (started here unless the round before started it); with
        ``start_next`` round ``rnd + 1`` is started before this one's evaluation."""
        if self.started is None or self.started[0] != rnd:
            self._start(rnd)
        _, selected, global_F, t_round = self.started
        attempt = self._attempts(rnd, selected, global_F)
        updates = attempt.updates
        order = updates.ids()
        weights = [updates.counts[c] for c in order]
        new_F, agg_stats = self.algorithm.aggregate(rnd, global_F, updates, selected=len(selected),
                                                    num_clients=self.num_clients)
        self.global_state = self.layout.unflatten(new_F)
        self.layout.load(self.model, new_F)
        counts = self.transport.counter.snapshot_and_reset()  # before the next round's messages
        if start_next:
            why = self._stop_before(rnd + 1, time.perf_counter() - t_round)
            if why is None:
                self._start(rnd + 1)
            else:
                self.stopped = (rnd, why)
                self._event(rnd, "stopped", f"stopped after round {rnd} to be continued: {why}")
        served = attempt.served()
        row: dict[str, Any] = {"selected": np.array(order, dtype=np.float64),
                               "agg_weights": np.array(weights, dtype=np.float64) / max(sum(weights), 1),
                               "clients_dropped": float(len(set(selected) - updates.counts.keys())), **agg_stats,
                               **served}
        row["bytes_recv_per_client"] = np.array([attempt.client_bytes.get(c, 0) for c in order], dtype=np.float64)
        if self.clock is not None:
            shards = {c: int(self.shard_sizes[c]) if self.shard_sizes is not None else updates.counts[c] for c in order}
            sim = self.clock.round(shards, attempt.requests, attempt.update_bytes,
                                   {c: HEADER_BYTES + self._held(rnd, c) * global_F.element_size() for c in order},
                                   rnd=rnd)
            row.update(round_row(sim, order))
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
        """What a checkpoint holds: the global client-trained state, plus what the server trains itself."""
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

    def _stop_before(self, rnd: int, running_s: float = 0.0) -> str | None:
        """Why round ``rnd`` should not start (a stop request, the time budget), or None.
        ``running_s``: how long the round in progress has run so far."""
        longest = max([running_s, *(h["round_s"] for h in self.history)])
        return self.stopper.stop_before(rnd, longest)

    # -- starting and retrying ----------------------------------------------------------
    def _start(self, rnd: int) -> None:
        """Send round ``rnd``'s START and parameters (its first attempt) to every host."""
        t_round = time.perf_counter()
        selected = self.algorithm.select_clients(rnd, self.num_clients)
        global_F = self.layout.flatten(self.global_state)
        self._send_start(rnd, 0, selected, global_F)
        self.started = (rnd, selected, global_F, t_round)

    def _send_start(self, rnd: int, attempt: int, chosen: list[int], global_F: torch.Tensor) -> None:
        chosen_set = set(chosen)
        for rank, cids in self.hosts.items():
            mine = torch.tensor([c for c in cids if c in chosen_set], dtype=torch.int64)
            self.transport.send(rank, Kind.START, mine, round=rnd, attempt=attempt)
            for cid in mine.tolist():
                idx = self.algorithm.wire_index(rnd, cid)   # the part of the vector the client holds
                self.transport.send(rank, Kind.PARAMS, global_F if idx is None else global_F[idx], round=rnd,
                                    attempt=attempt, client=cid, aux=self.algorithm.client_settings(rnd, cid).batch_size)

    def _held(self, rnd: int, cid: int) -> int:
        """How many values of the vector client ``cid`` holds (receives and returns) in round ``rnd``."""
        idx = self.algorithm.wire_index(rnd, cid)
        return self.layout.numel if idx is None else idx.numel()

    def _attempts(self, rnd: int, selected: list[int], global_F: torch.Tensor) -> Attempt:
        """Run round ``rnd`` until at least ``--min-clients`` clients survive it; -> the surviving attempt.

        A retry (at most ``--round-retries``) leaves out the clients whose host
        timed out (it is still busy with the failed attempt) and carries a new
        attempt number, so nothing from the failed attempt is mistaken for the
        retry's.
        """
        comm = self.cfg.comm
        excluded: set[int] = set()
        for number in range(comm.round_retries + 1):
            chosen = [c for c in selected if c not in excluded]
            if number:  # the first attempt was started by _start
                self._send_start(rnd, number, chosen, global_F)
            updates = Updates(self.layout.numel, self.algorithm.streams(),
                              lambda cid: self.algorithm.wire_index(rnd, cid))
            attempt = self.service.serve(self.expected(rnd, number, chosen), updates)
            survivors = len(attempt.updates)
            if survivors >= comm.min_clients:
                return attempt
            excluded |= attempt.timed_out
            dropped = sorted(set(selected) - attempt.updates.counts.keys())
            why = (f"round {rnd}: {survivors} of {len(selected)} selected clients survived "
                   f"(--min-clients {comm.min_clients}; dropped: {short(dropped)})")
            if number < comm.round_retries:
                log.warning("%s; retry %d of %d", why, number + 1, comm.round_retries)
                self._event(rnd, "retry", f"{why}; retry {number + 1} of {comm.round_retries}")
                continue
            self._event(rnd, "stopped", why)
            raise RunStopped(f"{why} after {comm.round_retries} retries (--round-retries); the global model of "
                             f"round {rnd - 1} is in the checkpoint: fix the failing clients or lower "
                             f"--min-clients, then continue with --resume {self.run_dir or 'RUN_DIR'}")
        raise AssertionError("unreachable")

    def expected(self, rnd: int, attempt: int, chosen: list[int]) -> Expected:
        """What attempt ``attempt`` of round ``rnd`` accepts from the clients in ``chosen``."""
        algo = self.algorithm
        return Expected(rnd, attempt, self.host_of, frozenset(chosen), self.layout.numel, self.model.tokens,
                        self.model.width, lambda cid: algo.client_settings(rnd, cid).batch_size,
                        wire_dtype(self.cfg.comm.wire_dtype), lambda cid: self._held(rnd, cid))

    def _event(self, rnd: int, kind: str, text: str) -> None:
        if self.metrics is not None:
            self.metrics.event(rnd, kind, text)

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Accuracy and mean loss of the full model with the global trained parameters."""
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
