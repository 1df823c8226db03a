"""FedAvg (McMahan et al. 2017) on the whole model: full fine-tuning and linear probing.

Each client holds the whole model, trains ``--split-epochs`` epochs over all
of its samples at ``--lr`` and sends its trained parameters; the server
averages them weighted by sample count and evaluates. No activations travel.
"""

from __future__ import annotations

from .base import Algorithm, ClientRound, classifier_names, timed


class WholeModel(Algorithm):
    """The base of every algorithm that trains the whole model on the client (FedAvg, FedPEFT)."""

    def client_round(self, ctx: ClientRound) -> dict[str, float]:
        stats: dict[str, float] = {}
        with timed(stats, "time/local"):
            stats["train_loss"], stats["train_acc"] = ctx.train(ctx.model, ctx.shard, self.cfg.fed.split_epochs,
                                                                ctx.settings.lr)
        stats["kept"] = len(ctx.shard)
        return stats


class FedAvgFull(WholeModel):
    name = "fl-full"
    trains = "every parameter"

    def trained_names(self, model):
        return [n for n, _ in model.named_parameters()]


class FedAvgLinear(WholeModel):
    name = "fl-linear"
    trains = "the classifier"

    def trained_names(self, model):
        return classifier_names(model)
