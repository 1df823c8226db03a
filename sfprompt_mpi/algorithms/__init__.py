"""Federated algorithms as plug-ins, found by name (``--algo``).

Each algorithm family is one module of this package; each algorithm is a
subclass of :class:`~sfprompt_mpi.algorithms.base.Algorithm`. The registry
below maps an ``--algo`` name to ``module:Class`` and imports nothing until
an algorithm is asked for, so the config and the launcher (which check
``--algo`` before torch is imported) stay light. Adding an algorithm is one
module, its tests and one line here; see ``docs/algorithms.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Algorithm

#: ``--algo`` name -> "module:Class", in the order tables list them. A module name without a dot is
#: one of this package's; a dotted one is imported as it stands (an algorithm kept outside the package).
REGISTRY: dict[str, str] = {
    "sfprompt": "sfprompt:SFPrompt",
    "fl-full": "fedavg:FedAvgFull",
    "fl-linear": "fedavg:FedAvgLinear",
    "fedpeft-prompt": "fedpeft:FedPEFTPrompt",
    "fedpeft-bias": "fedpeft:FedPEFTBias",
    "fedpeft-adapter": "fedpeft:FedPEFTAdapter",
    "sfl-full": "splitfed:SplitFedFull",
    "sfl-linear": "splitfed:SplitFedLinear",
}
#: The registered names (a live view: ``--algo``'s choices follow the registry).
ALGOS = REGISTRY.keys()


def algorithm_class(name: str) -> type["Algorithm"]:
    """The class registered as ``name`` (a KeyError for an unknown one; the config refuses those first)."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), cls)


def build_algorithm(cfg: "Config") -> "Algorithm":
    """The algorithm of ``cfg.fed.algo``, bound to ``cfg``."""
    return algorithm_class(cfg.fed.algo)(cfg)
