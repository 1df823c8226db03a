"""MergeSFL (Liao et al., arXiv 2311.13348, ICDE 2024) on the U-shaped split.

Three mechanisms, each with an ablation switch:

- **Feature merging** (``--merge-features``): the server trains the body. Every
  iteration it waits for the activations of all the round's clients, runs the
  body once on their concatenation (client order), takes one optimiser step on
  the merged mean loss and dispatches to each client the gradient of *its own*
  mean loss (:class:`~sfprompt_mpi.fed.body.MergedBody` does the scaling).
  Labels stay on the clients, who hold the tail (the paper sends them to the
  server, which holds the top); each client returns dL_i/d(body output), which
  the server scales by d_i / D. Clients advance in lockstep, ``--iterations``
  per round, a host's clients interleaved. Off: the server serves one client
  after the other (as ``sfl-full``).
- **Batch-size regulation** (``--batch-regulation``, needs ``--devices``):
  client i's iteration takes t_i = d_i a_i + c_i on its device (a_i: seconds per
  sample of compute and transfers, c_i: latencies, the simulated clock's model);
  the batches d_i equalise t_i for the round's clients at a merged batch of
  K x ``--batch-size``, within [``--min-batch``, ``--max-batch``], scaled down
  when the merged activations could not reach the server through its link
  (its ``mbps``) within an iteration.
- **Participant selection** (``--selection kl``): a genetic algorithm picks the
  K clients whose merged label mixture sum_i d_i p_i / sum_i d_i is closest to
  the global label distribution in KL divergence, among 2K candidates drawn by
  the seed each round (our choice: over all N the same K win every round when
  the devices do not change). The label histograms are read from the
  partition: in the U-shaped split labels never travel, so the server learns
  them here as it would from the clients' reports.

Clients' head and tail are averaged weighted by their batch sizes
(``--merge-weights batch``) or uniformly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..fed.body import MergedBody, TrainedBody
from ..fed.mailbox import Rejected
from ..fed.state import derive_seed
from ..fed.training import take_batch
from ..simclock import transfer_s
from .base import SPLIT_SETTINGS, ClientRound, ClientSettings, ClientsView
from .splitfed import SplitFedFull

MERGE_SETTINGS = frozenset({"merge_features", "batch_regulation", "selection", "merge_weights", "iterations",
                            "min_batch", "max_batch"})
_EPS = 1e-8


class MergeSFL(SplitFedFull):
    name = "mergesfl"
    reads = (SPLIT_SETTINGS - {"server_batch", "max_pending"}) | MERGE_SETTINGS
    trains = "head + tail on the clients, the body on the server (one step per merged batch)"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.view: ClientsView | None = None
        self.speeds: tuple[np.ndarray, np.ndarray] | None = None  # per client: (a, c), see _speeds
        self.batches: dict[int, dict[int, int]] = {}     # round -> client -> batch size

    # -- the server's choices ------------------------------------------------------
    def observe_clients(self, view: ClientsView) -> None:
        self.view = view
        self.speeds = self._speeds()

    def select_clients(self, rnd: int, num_clients: int) -> list[int]:
        fed = self.cfg.fed
        if fed.selection == "kl" and self.view is not None and self.view.label_counts_NC is not None:
            k = len(super().select_clients(rnd, num_clients))
            pool = self.candidates(rnd, num_clients, k)
            rng = np.random.default_rng(derive_seed(self.cfg.run.seed, rnd, 0x6A))
            chosen = sorted(pool[i] for i in genetic_selection(lambda ids: self._objective([pool[i] for i in ids]),
                                                                len(pool), k, rng))
        else:
            chosen = super().select_clients(rnd, num_clients)
        self.batches[rnd] = self.regulate(chosen)
        for old in [r for r in self.batches if r < rnd - 1]:
            del self.batches[old]
        return chosen

    def candidates(self, rnd: int, num_clients: int, k: int) -> list[int]:
        """The clients round ``rnd`` selects from: 2k of them drawn by the seed (all when fewer), so that the
        selection rotates; with every client a candidate, the same K would win every round."""
        rng = np.random.default_rng(derive_seed(self.cfg.run.seed, rnd, 0xCA7D))
        return sorted(rng.permutation(num_clients)[:min(num_clients, 2 * k)].tolist())

    def regulate(self, chosen: list[int]) -> dict[int, int]:
        """The batch of each chosen client (``--batch-size`` for all without regulation or devices)."""
        if not self.cfg.fed.batch_regulation or self.speeds is None:
            return {c: self.cfg.fed.batch_size for c in chosen}
        a, c = self.speeds
        batches = regulate_batches(a[chosen], c[chosen], merged=len(chosen) * self.cfg.fed.batch_size,
                                   bounds=self._bounds(), ingress=self._ingress())
        return {chosen[i]: b for i, b in batches.items()}

    def client_settings(self, rnd: int, cid: int) -> ClientSettings:
        batch = self.batches.get(rnd, {}).get(cid, self.cfg.fed.batch_size)
        return ClientSettings(batch_size=batch, lr=self.cfg.fed.lr)

    def _objective(self, chosen: list[int]) -> float:
        """KL divergence of the merged label mixture of ``chosen`` (their regulated batches) from the global one."""
        counts = self.view.label_counts_NC
        batches = self.regulate(chosen)
        return merged_kl(counts, chosen, [batches[c] for c in chosen])

    def _speeds(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(a, c) per client: seconds per sample of an iteration and fixed seconds (latencies), or None."""
        v = self.view
        if v is None or v.devices is None or v.pass_flops is None:
            return None
        f, s = v.pass_flops, v.sample_bytes
        flops = f.head_fwd + f.head_bwd + f.tail_fwd + f.tail_bwd
        a = np.array([flops / (d.tflops * 1e12) + 2 * (transfer_s(s, d.up_mbps, d, v.devices.server)
                                                       + transfer_s(s, d.down_mbps, d, v.devices.server))
                      - 4 * d.latency_ms / 1e3 for d in v.devices.clients])
        c = np.array([4 * d.latency_ms / 1e3 for d in v.devices.clients])
        return a, c

    def _bounds(self) -> tuple[int, int]:
        fed = self.cfg.fed
        return fed.min_batch, fed.max_batch or 4 * fed.batch_size

    def _ingress(self) -> float | None:
        """Samples per second the server's link takes in (activations and gradients; None: no limit)."""
        mbps = self.view.devices.server.mbps
        return mbps * 1e6 / 8 / (2 * self.view.sample_bytes) if mbps else None

    # -- the clients' rounds ----------------------------------------------------------
    def server_policy(self):
        return MergedBody.policy if self.cfg.fed.merge_features else TrainedBody.policy

    def server_body(self, model, device):
        body = MergedBody if self.cfg.fed.merge_features else TrainedBody
        return body(model, device, bf16=self.cfg.comm.server_dtype == "bfloat16",
                    params=self.server_trained_names(model), cfg=self.cfg)

    def lockstep(self) -> bool:
        return self.cfg.fed.merge_features

    def client_round(self, ctx: ClientRound) -> dict[str, float]:
        """Without merging: ``--iterations`` split steps, one client at a time."""
        opt = ctx.trainer.optimizer(ctx.settings.lr)
        ctx.model.train()
        t0, losses = time.perf_counter(), []
        for images, labels in self._batches(ctx):
            loss = F.cross_entropy(ctx.split_forward(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        waited = ctx.remote_body.waited
        return self._stats(ctx, losses, time.perf_counter() - t0 - waited, waited)

    def client_rounds(self, ctxs: dict[int, ClientRound]) -> dict[int, dict[str, float]]:
        """With merging: every iteration, each client's activations go out before any reply is awaited."""
        live = {cid: _Lockstep(ctx, ctx.trainer.optimizer(ctx.settings.lr),
                               self._batches(ctx)) for cid, ctx in sorted(ctxs.items())}
        t0 = time.perf_counter()
        for _ in range(self.cfg.fed.iterations):
            for phase in (_Lockstep.send_acts, _Lockstep.tail_step, _Lockstep.head_step):
                for cid in list(live):
                    try:
                        phase(live[cid])
                    except Rejected as exc:
                        for gone in ([exc.client] if exc.client in live else list(live)):
                            del live[gone]
        elapsed = time.perf_counter() - t0
        waited = {cid: s.ctx.remote_body.waited for cid, s in live.items()}
        return {cid: self._stats(s.ctx, s.losses, (elapsed - sum(waited.values())) / max(len(live), 1), waited[cid])
                for cid, s in live.items()}

    def _batches(self, ctx: ClientRound) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``--iterations`` batches of the client's batch size, cycling through reshuffled passes of its shard."""
        n, b = len(ctx.shard), min(ctx.settings.batch_size, len(ctx.shard))
        order: list[int] = []
        for _ in range(self.cfg.fed.iterations):
            take: list[int] = []
            while len(take) < b:
                if not order:
                    order = torch.randperm(n, generator=ctx.generator).tolist()
                k = b - len(take)
                take += order[:k]
                del order[:k]
            images, labels = take_batch(ctx.trainer.dataset, ctx.shard[np.array(take)])
            yield images.to(ctx.trainer.device), labels.to(ctx.trainer.device)

    def _stats(self, ctx: ClientRound, losses: list[float], split_s: float, waited: float) -> dict[str, float]:
        batch = min(ctx.settings.batch_size, len(ctx.shard))
        return {"kept": float(len(losses) * batch), "batch": float(batch),
                "split_loss": float(np.mean(losses)) if losses else float("nan"),
                "time/split": split_s, "time/wait": waited}

    def aggregation_weight(self, shard: int, settings: ClientSettings) -> int:
        return settings.batch_size if self.cfg.fed.merge_weights == "batch" else 1

    # -- cost --------------------------------------------------------------------------
    def kept_count(self, shard: int) -> int:
        return self.cfg.fed.iterations * self.cfg.fed.batch_size

    def client_flops(self, shard, f):
        return {"split": self.kept_count(shard) * (f.head_fwd + f.head_bwd + f.tail_fwd + f.tail_bwd)}

    def server_flops(self, shard, f):
        return self.kept_count(shard) * (f.body_fwd + f.body_bwd)

    def describe(self, model, counts, trained):
        fed = self.cfg.fed
        return super().describe(model, counts, trained) + [
            f"  MergeSFL: {fed.iterations} iterations per round; merging {'on' if fed.merge_features else 'off'}, "
            f"batch regulation {'on' if fed.batch_regulation else 'off'}, selection {fed.selection}, "
            f"{fed.merge_weights}-weighted aggregation"]


@dataclass
class _Lockstep:
    """One client's iteration, in the three phases a host interleaves across its clients."""

    ctx: ClientRound
    opt: torch.optim.Optimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self) -> None:
        self.losses: list[float] = []
        self.ctx.model.train()

    def send_acts(self) -> None:
        images, self.labels = next(self.batches)
        self.acts_BND = self.ctx.model.head(images)
        self.step = self.ctx.remote_body.post_acts(self.acts_BND.detach(), True)

    def tail_step(self) -> None:
        link = self.ctx.remote_body
        out_BND = link.body_out(self.step, tuple(self.acts_BND.shape)).requires_grad_(True)
        loss = F.cross_entropy(self.ctx.model.tail(out_BND), self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.losses.append(float(loss.detach()))
        link.post_grad(self.step, out_BND.grad)

    def head_step(self) -> None:
        g_BND = self.ctx.remote_body.grad_acts(self.step, tuple(self.acts_BND.shape))
        self.acts_BND.backward(g_BND)
        self.opt.step()
        del self.acts_BND


def merged_kl(counts_NC: np.ndarray, chosen: list[int], batches: list[int]) -> float:
    """KL(merged || global): the chosen clients' label distributions mixed by their batches, against the
    label distribution of all clients' data."""
    p_KC = counts_NC[chosen] / np.maximum(counts_NC[chosen].sum(1, keepdims=True), 1)
    d_K = np.asarray(batches, dtype=float)
    return kl_divergence((d_K[:, None] * p_KC).sum(0) / d_K.sum(), counts_NC.sum(0) / counts_NC.sum())


def genetic_selection(objective, n: int, k: int, rng: np.random.Generator, *, population: int = 40,
                      generations: int = 60, mutation: float = 0.2, elite: int = 2) -> list[int]:
    """``k`` of ``n`` clients minimising ``objective(sorted ids)``: a genetic algorithm over k-subsets
    (tournaments of 3, uniform crossover repaired to k members, swap mutation, the best kept)."""
    if k >= n:
        return list(range(n))
    cache: dict[tuple[int, ...], float] = {}

    def cost(ind: tuple[int, ...]) -> float:
        if ind not in cache:
            cache[ind] = objective(list(ind))
        return cache[ind]

    pop = [tuple(sorted(rng.choice(n, size=k, replace=False).tolist())) for _ in range(population)]
    for _ in range(generations):
        ranked = sorted(pop, key=lambda ind: (cost(ind), ind))
        nxt = ranked[:elite]
        while len(nxt) < population:
            a, b = (min((ranked[i] for i in rng.integers(0, len(ranked), 3)), key=lambda ind: (cost(ind), ind))
                    for _ in range(2))
            nxt.append(_child(a, b, n, k, rng, mutation))
        pop = nxt
    return list(min(pop, key=lambda ind: (cost(ind), ind)))


def _child(a: tuple[int, ...], b: tuple[int, ...], n: int, k: int, rng: np.random.Generator,
           mutation: float) -> tuple[int, ...]:
    """Uniform crossover of two k-subsets, repaired to k members, with a swap mutation."""
    both, either = set(a) & set(b), sorted(set(a) ^ set(b))
    picked = both | {x for x in either if rng.random() < 0.5}
    rest = sorted(set(range(n)) - picked)
    while len(picked) > k:
        picked.discard(sorted(picked)[int(rng.integers(len(picked)))])
    while len(picked) < k:
        picked.add(rest.pop(int(rng.integers(len(rest)))))
    if rng.random() < mutation:
        out = sorted(set(range(n)) - picked)
        picked.discard(sorted(picked)[int(rng.integers(k))])
        picked.add(out[int(rng.integers(len(out)))])
    return tuple(sorted(picked))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two distributions, smoothed by 1e-8."""
    p, q = p + _EPS, q + _EPS
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def regulate_batches(a: np.ndarray, c: np.ndarray, *, merged: int, bounds: tuple[int, int],
                     ingress: float | None) -> dict[int, int]:
    """Batches d_i (by position) with d_i a_i + c_i equal for all, summing to about ``merged``, within
    ``bounds``; scaled down when ``sum d_i`` samples could not reach the server within an iteration at
    ``ingress`` samples per second."""
    inv = 1.0 / a
    t = (merged + (c * inv).sum()) / inv.sum()
    d = np.maximum((t - c) * inv, 0.0)
    if ingress is not None and d.sum() > ingress * t:
        d *= ingress * t / d.sum()
    lo, hi = bounds
    return {i: int(np.clip(np.rint(x), lo, hi)) for i, x in enumerate(d)}
