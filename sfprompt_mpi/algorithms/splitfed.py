"""SplitFed (Thapa et al. 2022) on the same cut as SFPrompt, without prompts.

``sfl-full``: clients train head and tail, the server trains the body itself,
one optimiser step per client mini-batch (after computing that batch's
activation gradient with the old weights), serving the selected clients one
at a time in client-id order, so the run is deterministic. ``sfl-linear``:
only the classifier trains; the body stays frozen and no gradient travels
back to the clients. Both train ``--split-epochs`` epochs over all samples.
"""

from __future__ import annotations

from ..fed.body import TrainedBody
from .base import SPLIT_SETTINGS, Algorithm, ClientRound, classifier_names


class SplitFed(Algorithm):
    split = True

    def client_round(self, ctx: ClientRound) -> dict[str, float]:
        return {"kept": len(ctx.shard), **ctx.split_train(ctx.shard, self.cfg.fed.split_epochs, ctx.settings.lr)}


class SplitFedFull(SplitFed):
    name = "sfl-full"
    reads = SPLIT_SETTINGS - {"server_batch", "max_pending"}  # served one client at a time, every graph kept
    trains = "head + tail on the clients, the body on the server"

    def trained_names(self, model):
        return model.names_in("head", "tail")

    def server_trained_names(self, model):
        return model.names_in("body")

    def server_policy(self):
        return TrainedBody.policy

    def server_body(self, model, device):
        return TrainedBody(model, device, bf16=self.cfg.comm.server_dtype == "bfloat16",
                           params=self.server_trained_names(model), cfg=self.cfg)


class SplitFedLinear(SplitFed):
    name = "sfl-linear"
    reads = SPLIT_SETTINGS
    trains = "the classifier"

    def trained_names(self, model):
        return classifier_names(model)
