"""SFPrompt (arXiv 2407.17533): soft prompts, a frozen server body, the local-loss update, EL2N pruning.

A client's round has three phases:

1. local-loss update: prompts and tail (and head with ``--train-head``) train
   for ``--local-epochs`` epochs with the head's output fed straight into the
   tail, the body skipped (no server traffic);
2. EL2N pruning: every local sample is scored with
   ``||softmax(f(x)) - onehot(y)||_2`` under head -> tail and the
   ``ceil(keep_ratio * n)`` highest are kept;
3. split training over the kept samples through the server's frozen body.
"""

from __future__ import annotations

import torch

from ..fed.pruning import el2n_scores, keep_count, select_highest
from .base import SPLIT_SETTINGS, Algorithm, ClientRound, in_model_order, timed


class SFPrompt(Algorithm):
    name = "sfprompt"
    split = True
    prompts = True
    reads = SPLIT_SETTINGS | {"prompt_len", "prompt_depth", "train_head", "local_loss", "local_epochs",
                              "local_lr", "keep_ratio"}
    trains = "prompts + tail (+ head with --train-head)"

    def trained_names(self, model):
        parts = ("head", "tail") if self.cfg.model.train_head else ("tail",)
        return in_model_order(model, set(model.names_in(*parts)) | {n for n, _ in model.named_parameters()
                                                                  if n.startswith("prompts.")})

    def local_phase(self) -> bool:
        """Whether the local-loss update runs."""
        return self.cfg.fed.local_loss and self.cfg.fed.local_epochs > 0

    def client_round(self, ctx: ClientRound) -> dict[str, float]:
        fed, model, stats = self.cfg.fed, ctx.model, {}
        with timed(stats, "time/local"):
            if self.local_phase():
                stats["local_loss"], stats["local_acc"] = ctx.train(model.local_forward, ctx.shard,
                                                                    fed.local_epochs, fed.local_lr)
        with timed(stats, "time/prune"):
            kept = ctx.shard
            if fed.keep_ratio < 1.0:
                scores = self._scores(ctx)
                kept = ctx.shard[select_highest(scores, fed.keep_ratio).numpy()]
                stats.update(el2n_mean=float(scores.mean()), el2n_max=float(scores.max()))
        stats["kept"] = len(kept)
        stats.update(ctx.split_train(kept, fed.split_epochs, ctx.settings.lr))
        return stats

    @torch.no_grad()
    def _scores(self, ctx: ClientRound) -> torch.Tensor:
        """EL2N score of every local sample under the head->tail model -> ``scores_n``."""
        ctx.model.eval()
        batch = max(ctx.settings.batch_size, 256)
        return torch.cat([el2n_scores(ctx.model.local_forward(images), labels).cpu()
                          for images, labels in ctx.trainer.batches(ctx.shard, None, batch)])

    def kept_count(self, shard: int) -> int:
        ratio = self.cfg.fed.keep_ratio
        return keep_count(shard, ratio) if ratio < 1 else shard

    def client_flops(self, shard, f):
        fed = self.cfg.fed
        local = fed.local_epochs * shard * (f.local_fwd + f.local_bwd) if self.local_phase() else 0
        el2n = shard * f.local_fwd if fed.keep_ratio < 1 else 0
        return {"local": local, "el2n": el2n, **super().client_flops(shard, f)}

    def describe(self, model, counts, trained):
        fed = self.cfg.fed
        local = f"{fed.local_epochs} local-loss epoch(s) at {fed.local_lr:g}" if self.local_phase() else "no local-loss phase"
        prune = f"EL2N pruning keeps {fed.keep_ratio:g} of each shard" if fed.keep_ratio < 1 else "no pruning"
        return super().describe(model, counts, trained) + [f"  phases: {local}; {prune}; {fed.split_epochs} split "
                                                           f"epoch(s) at {fed.lr:g} over the kept samples"]
