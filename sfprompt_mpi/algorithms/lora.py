"""Federated LoRA on the whole model: ``fedlora`` (FedIT-style) and ``hetlora`` (HetLoRA-style).

Every client holds the whole frozen backbone with peft LoRA factors on the
``--lora-targets`` projections (:mod:`sfprompt_mpi.model.lora`) and trains the
factors and the classifier.

- ``fedlora``: every client the same LoRA, on the last ``--lora-depth`` blocks
  (0: all) at ``--lora-rank`` or the per-block ``--lora-ranks``; the server
  takes the exact FedAvg of the factors (A and B averaged separately, the
  usual practice).
- ``hetlora``: LoRA on every block; client ``i`` uses rank ``r_i`` from its
  device (``--devices``): ``--lora-rank`` scaled by its compute relative to
  the fastest device, rounded down to ``--lora-min-rank`` times a power of
  two. The model carries rank ``--lora-rank``; client ``i`` holds and
  exchanges the first ``r_i`` rows of each A and columns of each B (the rest
  are zero on its side), and the server averages each rank component over
  the clients that hold it, weighted by sample count (zero-padded
  aggregation). HetLoRA's rank self-pruning and sparsity-weighted
  aggregation are not reproduced.

Per-client ranks are a function of the config and the resolved device
profiles, which every rank holds, so the server and the client hosts agree on
them without a message.
"""

from __future__ import annotations

from ..model.lora import add_lora, is_factor, lora_index, parse_targets
from .base import ClientRound, classifier_names, in_model_order
from .fedavg import WholeModel

LORA_SETTINGS = frozenset({"lora_targets", "lora_rank", "lora_alpha"})


class LoRAModel(WholeModel):
    """The base of the LoRA algorithms: the model's LoRA, what trains, and per-client parts of the vector."""

    trains = "LoRA factors + classifier"
    reads = LORA_SETTINGS

    def model_ranks(self, depth: int) -> dict[int, int]:
        """Block -> the rank the model's LoRA has there (the largest any client uses)."""
        return {b: self.cfg.model.lora_rank for b in range(depth)}

    def adapt_model(self, model):
        m = self.cfg.model
        add_lora(model.vit, self.model_ranks(model.depth), parse_targets(m.lora_targets), m.lora_alpha)

    def trained_names(self, model):
        return in_model_order(model, [n for n, _ in model.named_parameters() if is_factor(n)]
                              + classifier_names(model))

    def start(self, model, shards):
        params = dict(model.named_parameters())
        self._names = self.trained_names(model)
        self._shapes = [tuple(params[n].shape) for n in self._names]
        self._depth = model.depth

    def client_ranks(self, rnd: int, cid: int) -> dict[int, int] | None:
        """Block -> rank client ``cid`` uses in round ``rnd`` (None: the model's LoRA as it is)."""
        return None

    def wire_index(self, rnd, cid):
        ranks = self.client_ranks(rnd, cid)
        return None if ranks is None else lora_index(self._names, self._shapes, ranks)

    def client_round(self, ctx: ClientRound) -> dict[str, float]:
        stats = super().client_round(ctx)
        return {**stats, **self.choices(ctx.round, ctx.cid)}

    def choices(self, rnd: int, cid: int) -> dict[str, float]:
        """What was chosen for client ``cid`` in round ``rnd``: stats ``choice/<name>`` (HDF5, analyze)."""
        ranks = self.client_ranks(rnd, cid) or self.model_ranks(self._depth)
        used = {b: r for b, r in ranks.items() if r > 0}
        return {"choice/depth": float(len(used)), **{f"choice/rank_block{b}": float(r) for b, r in used.items()}}


class FedLoRA(LoRAModel):
    name = "fedlora"
    reads = LORA_SETTINGS | {"lora_depth", "lora_ranks"}

    def model_ranks(self, depth):
        m = self.cfg.model
        ranks = [int(r) for r in m.lora_ranks.split(",")] if m.lora_ranks.strip() else []
        d = m.lora_depth or len(ranks) or depth
        if d > depth:
            from ..errors import UserError
            raise UserError(f"model.lora_depth {d} exceeds the model's {depth} blocks")
        ranks = ranks or [m.lora_rank] * d
        return {depth - d + i: r for i, r in enumerate(ranks)}


class HetLoRA(LoRAModel):
    name = "hetlora"
    reads = LORA_SETTINGS | {"lora_min_rank"}
    trains = "LoRA factors of per-device ranks + classifier"

    def client_ranks(self, rnd, cid):
        rank = device_rank(self.cfg, cid)
        return {b: rank for b in range(self._depth)}

    def choices(self, rnd, cid):
        return {"choice/rank": float(device_rank(self.cfg, cid))}


def device_rank(cfg, cid: int) -> int:
    """HetLoRA's rank of client ``cid``: ``--lora-rank`` times its compute over the fastest device's,
    rounded down to ``--lora-min-rank`` times a power of two (``--lora-rank`` without ``--devices``)."""
    m = cfg.model
    if cfg.devices is None:
        return m.lora_rank
    speeds = [float(t) for t in cfg.devices["tflops"]]
    want = m.lora_rank * speeds[cid] / max(speeds)
    rank = m.lora_min_rank
    while rank * 2 <= min(want, m.lora_rank):
        rank *= 2
    return rank
