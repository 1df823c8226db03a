"""FedPEFT (arXiv 2210.01708): parameter-efficient fine-tuning of the whole model on each client.

Three variants, each training its small set plus the classifier:
``fedpeft-prompt`` (soft prompts, ``--prompt-len``), ``fedpeft-bias`` (every
bias) and ``fedpeft-adapter`` (a bottleneck adapter after each block's MLP,
``--adapter-dim``; it starts as the identity and hangs off the block as
``vit.blocks.i.adapter``, so timm's names and pretrained weights stay).
"""

from __future__ import annotations

from ..model.adapters import add_adapters
from .base import classifier_names, in_model_order
from .fedavg import WholeModel


class FedPEFTPrompt(WholeModel):
    name = "fedpeft-prompt"
    prompts = True
    reads = frozenset({"prompt_len", "prompt_depth"})
    trains = "prompts + classifier"

    def trained_names(self, model):
        return in_model_order(model, [n for n, _ in model.named_parameters() if n.startswith("prompts.")]
                              + classifier_names(model))


class FedPEFTBias(WholeModel):
    name = "fedpeft-bias"
    trains = "every bias + classifier"

    def trained_names(self, model):
        return in_model_order(model, [n for n, _ in model.named_parameters() if n.endswith(".bias")]
                              + classifier_names(model))


class FedPEFTAdapter(WholeModel):
    name = "fedpeft-adapter"
    reads = frozenset({"adapter_dim"})
    trains = "bottleneck adapters + classifier"

    def adapt_model(self, model):
        add_adapters(model.vit, self.cfg.model.adapter_dim)

    def trained_names(self, model):
        return in_model_order(model, [n for n, _ in model.named_parameters() if ".adapter." in n]
                              + classifier_names(model))
