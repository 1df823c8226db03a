"""The client side of a round: local-loss update, EL2N pruning, split training.

A :class:`ClientHost` runs on one rank and hosts one or more virtual clients,
which train in turn. Each client holds the head and tail of the model, the
prompts and its own data shard; the body is reached only through messages to
the server (rank 0): ``ACTS`` -> ``BODY_OUT`` and ``GRAD_OUT`` -> ``GRAD_ACTS``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..comm.protocol import Kind, Message, Transport, expect, header_for
from ..config import Config, parse_fault
from ..model.split import PromptedViT
from .pruning import el2n_scores, select_highest
from .state import Layout, derive_seed

log = logging.getLogger(__name__)

SERVER = 0
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        self.wire = WIRE_DTYPES[cfg.comm.wire_dtype]
        self.timeout = cfg.comm.client_timeout
        self._params = dict(model.named_parameters())
        self.trainable = [self._params[n] for n in layout.names]
        self._current: tuple[int, int] | None = None
        self.fault = parse_fault(cfg.run.inject_fault) if cfg.run.inject_fault else None
        self.rank = transport.rank
        self._faulted = False

    def _fault(self, rnd: int, kinds: tuple[str, ...]) -> str | None:
        """The injected fault due now (first client of the round only), if any."""
        f = self.fault
        if f is not None and f.kind in kinds and f.rank == self.rank and f.round == rnd and not self._faulted:
            self._faulted = True
            return f.kind
        return None

    # -- the host loop --------------------------------------------------------
    def serve(self) -> None:
        """Answer rounds until the server says STOP."""
        while True:
            msg = self._recv("the next round (START or STOP)")
            if msg.header.kind == Kind.STOP:
                return
            expect(msg.header, Kind.START)
            rnd = msg.header.round
            self._faulted = False
            # The server sends every selected client's parameters right after START.
            todo = []
            for cid in msg.payload.tolist():
                params = self._recv(f"round {rnd} parameters for client {cid}")
                expect(params.header, Kind.PARAMS, round=rnd, client=cid, shape=(self.layout.numel,))
                todo.append((cid, params))
            for cid, params in todo:
                self._current = (rnd, cid)
                try:
                    flat_F, n, stats = self.run_client_round(rnd, cid, params.payload)
                except Rejected as exc:
                    log.warning("round %d: client %d left the round: %s", rnd, cid, exc)
                    continue
                finally:
                    self._current = None
                t0 = time.perf_counter()
                self.transport.send(SERVER, header_for(Kind.UPDATE, flat_F, round=rnd, client=cid, aux=n), flat_F)
                stats["time/upload"] = time.perf_counter() - t0
                if self.metrics is not None:
                    self.metrics.log({f"clients/{cid}/{k}": v for k, v in stats.items()}, rnd)
            if self.metrics is not None:
                counts = self.transport.counter.snapshot_and_reset()
                row = {f"bytes_sent/{k}": v for k, v in counts["sent"].items()}
                row.update({f"bytes_recv/{k}": v for k, v in counts["recv"].items()})
                row["peak_mem_mb"] = _peak_mem_mb()
                self.metrics.log(row, rnd)

    def _recv(self, what: str) -> Message:
        while True:
            msg = self.transport.recv(SERVER, timeout=self.timeout, waiting_for=what)
            h = msg.header
            if h.kind == Kind.ERROR:
                raise RuntimeError(f"the server failed ({what} was expected)")
            if h.kind != Kind.REJECT:
                return msg
            if self._current == (h.round, h.client):
                raise Rejected(f"the server refused its message at step {h.step}")
            # A refusal of an upload that already left: the client's round is over anyway.
            log.warning("round %d: the server refused client %d's upload", h.round, h.client)

    # -- one client's round ----------------------------------------------------
    def run_client_round(self, rnd: int, cid: int, global_F: torch.Tensor) -> tuple[torch.Tensor, int, dict]:
        """Train client ``cid`` from the global vector; -> (trained vector, sample count, stats)."""
        cfg = self.cfg.fed
        self.layout.write(self.model, self.layout.unflatten(global_F))
        shard = self.shards[cid]
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, rnd, cid))
        stats: dict[str, float] = {}

        t0 = time.perf_counter()
        if cfg.local_loss and cfg.local_epochs > 0:
            loss, acc = self._local_update(shard, gen)
            stats.update(local_loss=loss, local_acc=acc)
        t1 = time.perf_counter()
        if cfg.keep_ratio < 1.0:
            scores = self._score(shard)
            kept = shard[select_highest(scores, cfg.keep_ratio).numpy()]
            stats.update(el2n_mean=float(scores.mean()), el2n_max=float(scores.max()))
        else:
            kept = shard
        stats["kept"] = len(kept)
        t2 = time.perf_counter()
        split_loss, waited = self._split_train(rnd, cid, kept, gen)
        t3 = time.perf_counter()
        stats.update(split_loss=split_loss)
        stats.update({"time/local": t1 - t0, "time/prune": t2 - t1, "time/split": t3 - t2 - waited,
                      "time/wait": waited})
        flat_F = self.layout.flatten(self.layout.read(self.model))
        if self._fault(rnd, ("huge-norm",)):
            flat_F = global_F + (flat_F - global_F) * 1e6
        return flat_F, len(shard), stats

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg.fed
        if cfg.optimizer == "adam":
            return torch.optim.Adam(self.trainable, lr=lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(self.trainable, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _local_update(self, shard: np.ndarray, gen: torch.Generator) -> tuple[float, float]:
        """Head straight into tail (no server traffic) for ``local_epochs``."""
        opt = self._optimizer(self.cfg.fed.local_lr)
        self.model.train()
        total, correct, seen = 0.0, 0, 0
        for _ in range(self.cfg.fed.local_epochs):
            for pos in iter_batches(len(shard), self.cfg.fed.batch_size, gen):
                images, labels = self._batch(shard, pos)
                logits_BK = self.model.local_forward(images)
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

    def _split_train(self, rnd: int, cid: int, kept: np.ndarray, gen: torch.Generator) -> tuple[float, float]:
        """Head here, body on the server, tail here; -> (mean loss, seconds waiting on the server)."""
        opt = self._optimizer(self.cfg.fed.lr)
        self.model.train()
        total, seen, step, waited = 0.0, 0, 0, 0.0
        for _ in range(self.cfg.fed.split_epochs):
            for pos in iter_batches(len(kept), self.cfg.fed.batch_size, gen):
                images, labels = self._batch(kept, pos)
                acts_BND = self.model.head(images)
                need_grad = acts_BND.requires_grad
                wire_BND = acts_BND.detach().to(self.wire)
                fault = self._fault(rnd, ("wrong-shape", "nan", "crash", "hang", "slow"))
                if fault is not None:
                    wire_BND = _inject(fault, wire_BND, self.timeout)
                t0 = time.perf_counter()
                self.transport.send(SERVER, header_for(Kind.ACTS, wire_BND, round=rnd, client=cid, step=step,
                                                       aux=int(need_grad)), wire_BND)
                reply = self._recv(f"round {rnd} body output for client {cid} step {step}")
                waited += time.perf_counter() - t0
                expect(reply.header, Kind.BODY_OUT, round=rnd, client=cid, step=step, shape=tuple(acts_BND.shape))
                body_BND = reply.payload.to(self.device, torch.float32).requires_grad_(True)
                logits_BK = self.model.tail(body_BND)
                loss = F.cross_entropy(logits_BK, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if need_grad:
                    g_BND = body_BND.grad.to(self.wire)
                    t0 = time.perf_counter()
                    self.transport.send(SERVER, header_for(Kind.GRAD_OUT, g_BND, round=rnd, client=cid, step=step), g_BND)
                    reply = self._recv(f"round {rnd} activation gradient for client {cid} step {step}")
                    waited += time.perf_counter() - t0
                    expect(reply.header, Kind.GRAD_ACTS, round=rnd, client=cid, step=step, shape=tuple(g_BND.shape))
                    acts_BND.backward(reply.payload.to(self.device, torch.float32))
                opt.step()
                total += float(loss.detach()) * len(labels)
                seen += len(labels)
                step += 1
        return total / max(seen, 1), waited

    def _batch(self, indices: np.ndarray, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = take_batch(self.train, indices[pos.numpy()])
        return images.to(self.device), labels.to(self.device)


def _inject(kind: str, wire_BND: torch.Tensor, timeout: float) -> torch.Tensor:
    """Corrupt or delay an outgoing activation as ``--inject-fault`` asks."""
    log.warning("injecting fault %s", kind)
    if kind == "wrong-shape":
        return wire_BND[:, :-1].contiguous()
    if kind == "nan":
        return torch.full_like(wire_BND, float("nan"))
    if kind == "crash":
        raise RuntimeError("injected crash (--inject-fault)")
    time.sleep(timeout * (3 if kind == "hang" else 0.5))
    return wire_BND


def _peak_mem_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
