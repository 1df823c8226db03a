"""LEGEND (arXiv 2412.20004): LoRA depth and rank distribution per device.

Client ``i`` carries LoRA on its last ``l_i`` blocks (its depth, counted from
the output) with rank ``r_{i,b}`` in block ``b``; the blocks below run
without autograd (``torch.no_grad``: no backward, no stored activations).
What the paper does not say is reconstructed (``shared/papers/legend.md``):

- **capacity estimation**: each candidate configuration is priced by the
  simulated clock's own model (:func:`sfprompt_mpi.simclock.simulate`) on the
  client's device profile: the parameters down, the FLOPs of its training
  step at that depth (counted with torch's FLOP counter on the meta model,
  exactly the forward and backward the client runs) over its samples, the
  update up. The simulated devices do not vary, so the clock's measured
  history would give these same numbers; reading the profiles instead keeps
  the choice a function of what every rank knows (config, device profiles,
  every client's sample count), so server and clients agree without a
  message and ``--resume`` chooses as an uninterrupted run does.
- **configuration** (greedy): the round deadline ``T`` is the time the
  fastest client needs at full depth and ``--lora-rank`` everywhere, raised
  to what the slowest needs at ``--legend-min-depth`` and ``--lora-min-rank``.
  Each client gets the largest depth that meets ``T`` and its memory at the
  smallest rank; then ranks are doubled from the output block down (ranks
  never decrease towards the output, at most ``--lora-rank``) while ``T``
  and its memory still hold. A client whose memory holds no configuration
  is refused at setup.
- **layer-wise aggregation**: each position of each block's factors is the
  sample-weighted mean over the clients that hold it (their depth covers the
  block and their rank there covers the component): clients of the same
  rank average plainly, differing ranks are zero-padded (HetLoRA's rule);
  positions nobody held keep their value. The classifier is averaged over
  every client.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from ..comm.protocol import HEADER_BYTES
from ..config import per_configuration
from ..errors import UserError
from .base import ClientRound, timed
from .lora import LORA_SETTINGS, LoRAModel


def depth_forward(model, low: int):
    """The forward of a client whose lowest LoRA block is ``low``: embedding and blocks below it
    under ``torch.no_grad`` (no graph, no stored activations), the rest with autograd -> ``logits_BK``."""
    vit = model.vit

    def forward(images_BCHW: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x_BND = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images_BCHW))))
            for block in vit.blocks[:low]:
                x_BND = block(x_BND)
        for block in vit.blocks[low:]:
            x_BND = block(x_BND)
        return vit.forward_head(vit.norm(x_BND))
    return forward


class Legend(LoRAModel):
    name = "legend"
    reads = LORA_SETTINGS | {"lora_min_rank", "legend_min_depth"}
    trains = "LoRA factors of per-device depth and ranks + classifier"
    adapts_to_memory = True

    def start(self, model, shards):
        super().start(model, shards)
        self._shards = dict(shards)
        self._classes = model.vit.num_classes

    # -- what a configuration costs ----------------------------------------------------
    @cached_property
    def costs(self) -> "_Costs":
        return legend_costs(self.cfg, self._classes)

    def client_ranks(self, rnd, cid):
        return self.plan[cid]

    @cached_property
    def plan(self) -> dict[int, dict[int, int]]:
        """Client id -> block -> rank (the same every round: the profiles and sample counts do not change)."""
        return legend_plan(self.cfg, self.costs, self._shards)

    def client_round(self, ctx: ClientRound) -> dict[str, float]:
        low = min(self.plan[ctx.cid])
        stats: dict[str, float] = {}
        with timed(stats, "time/local"):
            stats["train_loss"], stats["train_acc"] = ctx.train(depth_forward(ctx.model, low), ctx.shard,
                                                                self.cfg.fed.split_epochs, ctx.settings.lr)
        stats["kept"] = len(ctx.shard)
        return {**stats, **self.choices(ctx.round, ctx.cid)}

    def round_flops(self, rnd, cid, shard, f):
        return {"train": self.cfg.fed.split_epochs * shard * self.costs.step_flops[len(self.plan[cid])]}

    def check_devices(self, devices, num_classes):
        costs = legend_costs(self.cfg, num_classes)
        m = self.cfg.model
        low = {b: m.lora_min_rank for b in range(costs.depth - min(m.legend_min_depth, costs.depth), costs.depth)}
        need = costs.memory(low)
        for cid, device in enumerate(devices.clients):
            if need > device.memory_gb * 1e9:
                raise UserError(f"--devices {devices.spec}: client {cid} ({device.name}, {device.memory_gb:g} GB) "
                                f"cannot hold even legend's smallest configuration (depth {len(low)}, rank "
                                f"{m.lora_min_rank}: {need / 1e9:.3g} GB); lower --batch-size or give it more memory_gb")


class _Costs:
    """Per-configuration FLOPs, bytes and memory of a LEGEND client, counted once on its model (built on the
    meta device, counted where :func:`sfprompt_mpi.estimate.counting` says)."""

    def __init__(self, cfg, num_classes: int) -> None:
        from ..estimate import _saved_bytes, counting
        from ..model.lora import block_of
        from ..model.split import freeze_except
        algo = Legend(cfg)
        model = algo.build_model(num_classes, meta=True)
        names = algo.trained_names(model)
        freeze_except(model, set(names))
        params = dict(model.named_parameters())
        self.depth, self.batch = model.depth, cfg.fed.batch_size
        self.weights = 4 * sum(p.numel() for p in params.values())
        self.per_param = 1 + (2 if cfg.fed.optimizer == "adam" else int(cfg.fed.momentum > 0))
        rank = cfg.model.lora_rank
        self.unit = [0] * self.depth          # values per rank unit of a block (in + out over its targets)
        self.block_params = [0] * self.depth  # trained values of a block at the model's rank
        self.fixed = 0                        # the classifier
        for n in names:
            b, size = block_of(n), params[n].numel()
            if b is None:
                self.fixed += size
            else:
                self.unit[b] += size // rank
                self.block_params[b] += size
        size = model.vit.patch_embed.img_size
        self.step_flops, self.saved = [0] * (self.depth + 1), [0] * (self.depth + 1)
        with counting(model) as device:
            images_BCHW = torch.zeros(2, 3, *size, device=device)
            labels_B = torch.zeros(2, dtype=torch.long, device=device)
            for d in range(1, self.depth + 1):
                forward = depth_forward(model, self.depth - d)
                self.saved[d] = _saved_bytes(lambda: forward(images_BCHW)) // 2
                self.step_flops[d] = _step_flops(forward, images_BCHW, labels_B) // 2

    def held(self, ranks: dict[int, int]) -> int:
        """Values a client with ``ranks`` holds (receives and sends)."""
        return self.fixed + sum(r * self.unit[b] for b, r in ranks.items())

    def memory(self, ranks: dict[int, int]) -> int:
        """Bytes: every weight, gradients and optimiser state of the covered blocks' factors and the
        classifier, the activations a batch keeps at this depth."""
        trained = self.fixed + sum(self.block_params[b] for b in ranks)
        return self.weights + 4 * self.per_param * trained + self.saved[len(ranks)] * self.batch


#: The :class:`_Costs` of a configuration, counted once per process (the memory check and the plan share them).
legend_costs = per_configuration()(_Costs)


def _step_flops(forward, images_BCHW, labels_B) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(forward(images_BCHW), labels_B).backward()
    return counter.get_total_flops()


def legend_plan(cfg, costs: _Costs, shards: dict[int, int]) -> dict[int, dict[int, int]]:
    """The greedy configuration of every client (module docstring): client id -> block -> rank."""
    m, L = cfg.model, costs.depth
    full = {b: m.lora_rank for b in range(L)}
    if cfg.devices is None:
        return {c: dict(full) for c in shards}
    from ..devices import Devices, from_record
    from ..simclock import simulate
    devices = from_record(cfg.devices, len(shards))

    def seconds(c: int, ranks: dict[int, int]) -> float:
        one = HEADER_BYTES + 4 * costs.held(ranks)
        work = cfg.fed.split_epochs * shards[c] * costs.step_flops[len(ranks)]
        solo = Devices(devices.spec, devices.server, (devices.clients[c],))
        return simulate({0: [("down", one), ("compute", work), ("up", one)]}, solo).seconds

    def fits(c: int, ranks: dict[int, int], deadline: float) -> bool:
        return seconds(c, ranks) <= deadline and costs.memory(ranks) <= devices.clients[c].memory_gb * 1e9

    def uniform(d: int, r: int) -> dict[int, int]:
        return {b: r for b in range(L - d, L)}
    low = min(m.legend_min_depth, L)
    deadline = max(min(seconds(c, full) for c in shards), max(seconds(c, uniform(low, m.lora_min_rank)) for c in shards))
    plan = {}
    for c in sorted(shards):
        d = next((d for d in range(L, low - 1, -1) if fits(c, uniform(d, m.lora_min_rank), deadline)), low)
        ranks = uniform(d, m.lora_min_rank)
        for b in range(L - 1, L - 1 - d, -1):      # from the output down: ranks never decrease towards it
            while ranks[b] * 2 <= min(m.lora_rank, ranks.get(b + 1, m.lora_rank)) and \
                    fits(c, {**ranks, b: ranks[b] * 2}, deadline):
                ranks[b] *= 2
        plan[c] = ranks
    return plan

