"""The client side of a round: local-loss update, EL2N pruning, split training.

A :class:`ClientHost` runs on one rank and hosts one or more virtual clients,
which train in turn. Each client holds the head and tail of the model, the
prompts and its own data shard; the body is reached only through messages to
the server (rank 0): ``ACTS`` -> ``BODY_OUT`` and ``GRAD_OUT`` -> ``GRAD_ACTS``.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..comm.protocol import Kind, Message, Transport, expect, from_wire, to_wire, wire_dtype
from ..config import Config
from ..model.split import PromptedViT
from .algos import algo_of, uses_sfprompt_phases
from .pruning import el2n_scores, select_highest
from .state import Layout, derive_seed

log = logging.getLogger(__name__)

SERVER = 0


def take_batch(dataset: Dataset, idx: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of ``idx`` (fast path for in-memory tensor datasets)."""
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors[0], dataset.tensors[1]
        return images[idx_t], labels[idx_t].long()
    items = [dataset[int(i)] for i in idx_t]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.long)


def iter_batches(n: int, batch_size: int, generator: torch.Generator | None):
    """Positions 0..n-1 in batches, shuffled by ``generator`` (None: in order)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def make_optimizer(params: list[torch.nn.Parameter], cfg: Config, lr: float) -> torch.optim.Optimizer:
    """The configured optimiser (``fed.optimizer``) over ``params`` at learning rate ``lr``."""
    fed = cfg.fed
    if fed.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=fed.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=fed.momentum, weight_decay=fed.weight_decay)


class Rejected(Exception):
    """The server refused one of this client's messages: the client leaves the round."""


class ClientHost:
    """Hosts the virtual clients of one rank and answers the server's round messages."""

    def __init__(self, cfg: Config, model: PromptedViT, layout: Layout, train: Dataset,
                 shards: dict[int, np.ndarray], transport: Transport, metrics: Any = None,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.model = model.to(device)
        self.layout = layout
        self.train = train
        self.shards = shards
        self.transport = transport
        self.metrics = metrics
        self.device = torch.device(device)
        self.wire = wire_dtype(cfg.comm.wire_dtype)
        self.timeout = cfg.comm.client_timeout
        self.algo = algo_of(cfg)
        self._params = dict(model.named_parameters())
        self.trainable = [self._params[n] for n in layout.names]
        self._current: tuple[int, int, int] | None = None  # (round, attempt, client) now training
        self.rank = transport.rank
        self._inbox: collections.deque[Message] = collections.deque()  # taken in by _drain, not yet used
        self._dropped: set[tuple[int, int, int]] = set()  # (round, attempt, client) the server dropped before it ran

    # -- the host loop --------------------------------------------------------
    def serve(self) -> None:
        """Answer rounds until the server says STOP.

        START carries the round and its attempt (0 unless the server retries
        the round); every message of the attempt carries both. A client the server dropped
        (REJECT, e.g. after this rank missed ``--client-timeout``) is skipped
        if it has not started yet and abandoned where it stands otherwise, so
        a host that fell behind catches up instead of training for nothing.
        """
        while True:
            msg = self._recv("the next round (START or STOP)")
            if msg.header.kind == Kind.STOP:
                return
            expect(msg.header, Kind.START)
            rnd, attempt = msg.header.round, msg.header.attempt
            self._dropped = {k for k in self._dropped if k[:2] >= (rnd, attempt)}
            # The server sends every selected client's parameters right after START.
            todo: list[tuple[int, torch.Tensor]] = []
            for cid in msg.payload.tolist():
                params = self._recv(f"round {rnd} parameters for client {cid}")
                expect(params.header, Kind.PARAMS, round=rnd, attempt=attempt, client=cid, shape=(self.layout.numel,))
                global_F = params.payload
                if todo and torch.equal(global_F, todo[-1][1]):
                    global_F = todo[-1][1]  # clients start from the same global vector: keep one copy, not K
                todo.append((cid, global_F))
            for cid, global_F in todo:
                self._drain()
                if (rnd, attempt, cid) in self._dropped:
                    log.warning("round %d: client %d was dropped by the server before it started; skipped", rnd, cid)
                    continue
                self._current = (rnd, attempt, cid)
                try:
                    flat_F, n, stats = self.run_client_round(rnd, cid, global_F, attempt)
                except Rejected as exc:
                    log.warning("round %d: client %d left the round: %s", rnd, cid, exc)
                    continue
                finally:
                    self._current = None
                if attempt:
                    stats["attempt"] = attempt
                t0 = time.perf_counter()
                self.transport.send(SERVER, Kind.UPDATE, flat_F, round=rnd, attempt=attempt, client=cid, aux=n)
                stats["time/upload"] = time.perf_counter() - t0
                if self.metrics is not None:
                    # flushed with the round's own row below: one flush per round, not per client
                    self.metrics.log({f"clients/{cid}/{k}": v for k, v in stats.items()}, rnd, flush=False)
            if self.metrics is not None:
                counts = self.transport.counter.snapshot_and_reset()
                row = {f"bytes_sent/{k}": v for k, v in counts["sent"].items()}
                row.update({f"bytes_recv/{k}": v for k, v in counts["recv"].items()})
                row["peak_mem_mb"] = _peak_mem_mb()
                self.metrics.log(row, rnd)

    def _recv(self, what: str) -> Message:
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

    def _take(self, msg: Message) -> bool:
        """Whether ``msg`` is for the caller; handles control messages and late replies itself."""
        h = msg.header
        if h.kind == Kind.KEEPALIVE:
            return False
        if h.kind == Kind.REJECT:
            if self._current == (h.round, h.attempt, h.client):
                raise Rejected("the server dropped it" + (f" at step {h.step}" if h.step >= 0 else ""))
            # A client that has not started yet, or whose upload already left.
            self._dropped.add((h.round, h.attempt, h.client))
            log.warning("round %d: the server dropped client %d", h.round, h.client)
            return False
        if h.kind in (Kind.START, Kind.STOP) and self._current is not None:
            # The server moved on without the running client (its REJECT went missing): leave too.
            self._inbox.appendleft(msg)
            raise Rejected(f"the server went on to {h.describe()}")
        if h.kind in (Kind.BODY_OUT, Kind.GRAD_ACTS) and self._current != (h.round, h.attempt, h.client):
            # A reply to a client that has since left its round: nobody waits for it.
            log.warning("discarded a late %s", h.describe())
            return False
        return True

    def _drain(self) -> None:
        """Take in, without waiting, what the server has already sent (REJECTs of clients not yet run)."""
        while self.transport.poll(SERVER):
            msg = self.transport.recv(SERVER, timeout=self.timeout, waiting_for="a message already announced")
            if msg.header.kind in (Kind.REJECT, Kind.KEEPALIVE):
                self._take(msg)
            else:
                self._inbox.append(msg)

    # -- one client's round ----------------------------------------------------
    def run_client_round(self, rnd: int, cid: int, global_F: torch.Tensor,
                         attempt: int = 0) -> tuple[torch.Tensor, int, dict]:
        """Train client ``cid`` from the global vector in ``attempt`` of round ``rnd``;
        -> (trained vector, sample count, stats)."""
        cfg = self.cfg.fed
        self.layout.write(self.model, self.layout.unflatten(global_F))
        shard = self.shards[cid]
        seed_parts = (rnd, cid, attempt) if attempt else (rnd, cid)  # a retry draws new batches
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, *seed_parts))
        stats: dict[str, float] = {}

        t0 = time.perf_counter()
        if not self.algo.split:  # the whole model here: plain local training, no server traffic
            loss, acc = self._train_whole(shard, gen, self.model, cfg.split_epochs, cfg.lr)
            stats.update(train_loss=loss, train_acc=acc, kept=len(shard), **{"time/local": time.perf_counter() - t0})
            return self._upload_vector(), len(shard), stats
        local_on, keep_ratio = uses_sfprompt_phases(self.cfg)
        if local_on:
            loss, acc = self._train_whole(shard, gen, self.model.local_forward, cfg.local_epochs, cfg.local_lr)
            stats.update(local_loss=loss, local_acc=acc)
        t1 = time.perf_counter()
        if keep_ratio < 1.0:
            scores = self._score(shard)
            kept = shard[select_highest(scores, keep_ratio).numpy()]
            stats.update(el2n_mean=float(scores.mean()), el2n_max=float(scores.max()))
        else:
            kept = shard
        stats["kept"] = len(kept)
        t2 = time.perf_counter()
        split_loss, waited = self._split_train(rnd, attempt, cid, kept, gen)
        t3 = time.perf_counter()
        stats.update(split_loss=split_loss)
        stats.update({"time/local": t1 - t0, "time/prune": t2 - t1, "time/split": t3 - t2 - waited,
                      "time/wait": waited})
        return self._upload_vector(), len(shard), stats

    def _upload_vector(self) -> torch.Tensor:
        """The trained parameters as the flat vector to upload."""
        return self.layout.flatten(self.layout.read(self.model))

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return make_optimizer(self.trainable, self.cfg, lr)

    def _train_whole(self, shard: np.ndarray, gen: torch.Generator, forward, epochs: int,
                     lr: float) -> tuple[float, float]:
        """``epochs`` epochs of ``forward`` (no server traffic): SFPrompt's local-loss update
        (head straight into tail) or the whole model of a non-split algorithm."""
        opt = self._optimizer(lr)
        self.model.train()
        total, correct, seen = 0.0, 0, 0
        for _ in range(epochs):
            for pos in iter_batches(len(shard), self.cfg.fed.batch_size, gen):
                images, labels = self._batch(shard, pos)
                logits_BK = forward(images)
                loss = F.cross_entropy(logits_BK, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(labels)
                correct += int((logits_BK.argmax(-1) == labels).sum())
                seen += len(labels)
        return total / max(seen, 1), correct / max(seen, 1)

    @torch.no_grad()
    def _score(self, shard: np.ndarray) -> torch.Tensor:
        """EL2N score of every local sample under the head->tail model -> ``scores_n``."""
        self.model.eval()
        scores = []
        for pos in iter_batches(len(shard), max(self.cfg.fed.batch_size, 256), None):
            images, labels = self._batch(shard, pos)
            scores.append(el2n_scores(self.model.local_forward(images), labels).cpu())
        return torch.cat(scores)

    def _split_train(self, rnd: int, attempt: int, cid: int, kept: np.ndarray,
                     gen: torch.Generator) -> tuple[float, float]:
        """Head here, body on the server, tail here; -> (mean loss, seconds waiting on the server)."""
        opt = self._optimizer(self.cfg.fed.lr)
        self.model.train()
        total, seen, step, waited = 0.0, 0, 0, 0.0
        for _ in range(self.cfg.fed.split_epochs):
            for pos in iter_batches(len(kept), self.cfg.fed.batch_size, gen):
                images, labels = self._batch(kept, pos)
                acts_BND = self.model.head(images)
                need_grad = acts_BND.requires_grad
                wire_BND = to_wire(acts_BND, self.wire)
                t0 = time.perf_counter()
                self.transport.send(SERVER, Kind.ACTS, wire_BND, round=rnd, attempt=attempt, client=cid, step=step,
                                    aux=int(need_grad))
                reply = self._recv(f"round {rnd} body output for client {cid} step {step}")
                waited += time.perf_counter() - t0
                expect(reply.header, Kind.BODY_OUT, round=rnd, attempt=attempt, client=cid, step=step,
                       shape=tuple(acts_BND.shape))
                body_BND = from_wire(reply.payload, self.device).requires_grad_(True)
                logits_BK = self.model.tail(body_BND)
                loss = F.cross_entropy(logits_BK, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if need_grad:
                    g_BND = to_wire(body_BND.grad, self.wire)
                    t0 = time.perf_counter()
                    self.transport.send(SERVER, Kind.GRAD_OUT, g_BND, round=rnd, attempt=attempt, client=cid, step=step)
                    reply = self._recv(f"round {rnd} activation gradient for client {cid} step {step}")
                    waited += time.perf_counter() - t0
                    expect(reply.header, Kind.GRAD_ACTS, round=rnd, attempt=attempt, client=cid, step=step,
                           shape=tuple(g_BND.shape))
                    acts_BND.backward(from_wire(reply.payload, self.device))
                opt.step()
                total += float(loss.detach()) * len(labels)
                seen += len(labels)
                step += 1
        return total / max(seen, 1), waited

    def _batch(self, indices: np.ndarray, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = take_batch(self.train, indices[pos.numpy()])
        return images.to(self.device), labels.to(self.device)


def _peak_mem_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
