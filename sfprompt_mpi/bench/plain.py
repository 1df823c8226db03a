"""The plain-PyTorch limit: a round's arithmetic with no federated machinery.

``python -m sfprompt_mpi.bench _plain --procs P --report FILE -- RUN_FLAGS...``
builds what ``python -m sfprompt_mpi.run RUN_FLAGS`` builds (the same data,
partition, initial model and trained parameters, from the project's pure
helpers) and then runs the rounds as a plain loop a user would write: each
selected client copies the global parameters into its model, trains them
with a fresh optimiser on its shard in the batches the run draws, the loop
averages the trained vectors weighted by sample count and evaluates. No
transport, no messages, no HDF5, no checks, no exact sum.

What a client does follows the algorithm's own settings:

- a whole-model algorithm trains the model ``--split-epochs`` epochs at ``--lr``;
- a split algorithm runs, when it has them, the local-loss phase (head
  straight into tail, ``--local-epochs`` at ``--local-lr``) and EL2N pruning
  (scores under head -> tail in batches of max(batch, 256), the highest
  ``--keep-ratio`` kept), then ``--split-epochs`` epochs of head -> body ->
  tail over the kept samples, the body's backward in the same autograd graph.

Algorithms whose server trains the body (SplitFed's) are refused: their
server-side optimiser is federated machinery this loop does not restate.

With ``--procs P > 1`` the clients are spread over P worker processes (one
torch thread each, contiguous blocks as client ranks get them); the global
vector and the trained vectors sit in shared memory, so a round moves no
bytes through pipes but a few control words. Rank 0's work (average,
evaluate) stays in the parent. The report holds each round's wall time and
the final global parameters (beside it, as ``.safetensors``), which the
``limit`` suite compares with the run's checkpoint. The loop and its workers import as a run's
ranks do (``sfprompt_mpi.lean``), so both sides call the same library code.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class PlainLoop:
    """One process's view of the job: data, model, shards; trains clients and evaluates."""

    def __init__(self, argv: list[str]) -> None:
        from ..algorithms import build_algorithm
        from ..config import parse_config
        from ..data.datasets import build_data
        from ..data.partition import partition_indices
        from ..errors import UserError
        from ..fed.state import Layout
        from ..runtime import _image_size, num_clients
        from ..world import World, single_process_layout
        cfg = parse_config(argv)
        self.cfg, self.algo = cfg, build_algorithm(cfg)
        torch.set_num_threads(cfg.run.threads or 1)
        data = build_data(cfg.data, _image_size(cfg), cfg.run.seed)
        self.model = self.algo.build_model(data.num_classes, quiet=True)
        if self.algo.server_trained_names(self.model):
            raise UserError(f"--algo {cfg.fed.algo}: its server trains the body; the plain loop restates "
                            "only client training, averaging and evaluation")
        names = self.algo.trained_names(self.model)
        self.layout = Layout(self.model, names)
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in set(names))
        self.trained = [params[n] for n in names]
        self.clients = num_clients(cfg, World(None, 0, 1, single_process_layout()))
        self.shards = partition_indices(data.train_labels, self.clients, cfg.data.partition, alpha=cfg.data.alpha,
                                        shards_per_client=cfg.data.shards_per_client, seed=cfg.run.seed)
        self.train_x, self.train_y = _tensors(data.train)  # rendered once, as a user would preload them
        self.test_x, self.test_y = _tensors(data.test)

    def train_client(self, global_F: torch.Tensor, rnd: int, cid: int) -> torch.Tensor:
        """Client ``cid``'s round from ``global_F`` -> its trained vector."""
        from ..fed.state import derive_seed
        fed = self.cfg.fed
        self.layout.load(self.model, global_F)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, rnd, cid))
        shard = self.shards[cid]
        if not self.algo.split:
            self._epochs(self.model, shard, gen, fed.split_epochs, fed.lr)
        else:
            reads, m = self.algo.reads, self.model
            if "local_loss" in reads and fed.local_loss and fed.local_epochs > 0:
                self._epochs(m.local_forward, shard, gen, fed.local_epochs, fed.local_lr)
            if "keep_ratio" in reads and fed.keep_ratio < 1.0:
                shard = shard[self._el2n_keep(shard).numpy()]
            self._epochs(lambda x: m.tail(m.body(m.head(x))), shard, gen, fed.split_epochs, fed.lr)
        return self.layout.flatten_model(self.model)

    def _epochs(self, forward, shard: np.ndarray, gen: torch.Generator, epochs: int, lr: float) -> None:
        fed = self.cfg.fed
        if fed.optimizer == "adam":  # fused: PyTorch's fastest form on CPU (each tensor in one pass)
            opt = torch.optim.Adam(self.trained, lr=lr, weight_decay=fed.weight_decay, fused=True)
        else:
            opt = torch.optim.SGD(self.trained, lr=lr, momentum=fed.momentum, weight_decay=fed.weight_decay,
                                  fused=True)
        self.model.train()
        idx = torch.as_tensor(shard, dtype=torch.long)
        for _ in range(epochs):
            order = torch.randperm(len(idx), generator=gen)
            for start in range(0, len(idx), fed.batch_size):
                pick = idx[order[start:start + fed.batch_size]]
                loss = F.cross_entropy(forward(self.train_x[pick]), self.train_y[pick])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    @torch.no_grad()
    def _el2n_keep(self, shard: np.ndarray) -> torch.Tensor:
        """Positions in ``shard`` of the highest EL2N scores under head -> tail."""
        from ..fed.pruning import el2n_scores, select_highest
        self.model.eval()
        idx, batch = torch.as_tensor(shard, dtype=torch.long), max(self.cfg.fed.batch_size, 256)
        scores = torch.cat([el2n_scores(self.model.local_forward(self.train_x[idx[s:s + batch]]),
                                        self.train_y[idx[s:s + batch]]) for s in range(0, len(idx), batch)])
        return select_highest(scores, self.cfg.fed.keep_ratio)

    @torch.no_grad()
    def evaluate(self, global_F: torch.Tensor) -> float:
        """Test accuracy of the model with ``global_F``, in batches of 256."""
        self.layout.load(self.model, global_F)
        self.model.eval()
        correct = 0
        for s in range(0, len(self.test_y), 256):
            correct += int((self.model(self.test_x[s:s + 256]).argmax(-1) == self.test_y[s:s + 256]).sum())
        return correct / len(self.test_y)


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.long)


def weighted_mean(updates_KF: torch.Tensor, weights: list[int]) -> torch.Tensor:
    """sum_k w_k x_k / sum_k w_k, accumulated in float64 in client order -> float32."""
    acc_F = torch.zeros(updates_KF.shape[1], dtype=torch.float64)
    for x_F, w in zip(updates_KF, weights):
        acc_F += x_F.double() * w
    return (acc_F / sum(weights)).float()


def _blocks(cids: list[int], procs: int) -> list[list[int]]:
    return [cids[p * len(cids) // procs:(p + 1) * len(cids) // procs] for p in range(procs)]


def _worker(argv: list[str], mine: list[int], global_F, updates_KF, conn) -> None:
    """A worker process: train ``mine`` of each round's selected clients into shared ``updates_KF``."""
    from ..lean import defer_imports
    defer_imports()
    loop = PlainLoop(argv)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        rnd, selected = msg
        for row, cid in enumerate(selected):
            if cid in mine:
                updates_KF[row].copy_(loop.train_client(global_F, rnd, cid))
        conn.send("done")


def run_plain(argv: list[str], procs: int) -> dict[str, Any]:
    """The job's rounds as a plain loop on ``procs`` processes -> round times, accuracy, final vector."""
    from ..fed.state import select_clients
    loop = PlainLoop(argv)
    cfg, k = loop.cfg, loop.clients
    global_F = loop.layout.flatten(loop.layout.read(loop.model)).share_memory_()
    updates_KF = torch.zeros(k, loop.layout.numel).share_memory_()
    procs = max(1, min(procs, k))
    workers = _start_workers(argv, _blocks(list(range(k)), procs), global_F, updates_KF) if procs > 1 else []
    rounds, acc = [], float("nan")
    try:
        for rnd in range(1, cfg.fed.rounds + 1):
            t0 = time.perf_counter()
            selected = select_clients(k, cfg.fed.fraction, cfg.run.seed, rnd)
            if workers:
                for _, conn in workers:
                    conn.send((rnd, selected))
                for _, conn in workers:
                    conn.recv()
            else:
                for row, cid in enumerate(selected):
                    updates_KF[row].copy_(loop.train_client(global_F, rnd, cid))
            global_F.copy_(weighted_mean(updates_KF[:len(selected)], [len(loop.shards[c]) for c in selected]))
            if rnd % cfg.run.eval_every == 0 or rnd == cfg.fed.rounds:
                acc = loop.evaluate(global_F)
            rounds.append(time.perf_counter() - t0)
    finally:
        for proc, conn in workers:
            conn.send(None)
            proc.join(timeout=30)
    return {"procs": procs, "round_s": rounds, "test_acc": acc,
            "final": {n: t.clone() for n, t in loop.layout.unflatten(global_F).items()}}


def _start_workers(argv, blocks, global_F, updates_KF):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    workers = []
    for mine in blocks:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(argv, mine, global_F, updates_KF, there), daemon=True)
        proc.start()
        workers.append((proc, here))
    for proc, conn in workers:
        if not conn.poll(600) or conn.recv() != "ready":
            raise RuntimeError(f"plain-loop worker {proc.pid} did not start")
    return workers


def plain_main(argv: list[str]) -> int:
    """``_plain --procs P --report FILE -- RUN_FLAGS``: the plain loop, its report written as JSON."""
    if len(argv) < 5 or argv[0] != "--procs" or argv[2] != "--report" or argv[4] != "--":
        print("usage: python -m sfprompt_mpi.bench _plain --procs P --report FILE -- RUN_FLAGS...", file=sys.stderr)
        return 2
    from ..lean import defer_imports, importing_for_good
    with importing_for_good():  # as the run's ranks start
        from safetensors.torch import save_file
        defer_imports()
    report, path = run_plain(argv[5:], int(argv[1])), Path(argv[3])
    save_file(report.pop("final"), str(path.with_suffix(".safetensors")))
    path.write_text(json.dumps(report) + "\n")
    return 0
