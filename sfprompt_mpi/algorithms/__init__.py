"""Federated algorithms as plug-ins, found by name (``--algo``).

Each algorithm family is one module of this package; each algorithm is a
subclass of :class:`~sfprompt_mpi.algorithms.base.Algorithm`. The registry
(:mod:`.registry`) maps an ``--algo`` name to ``module:Class``; a class is
imported only when it is asked for, so the config and the launcher (which
check ``--algo`` before torch is imported) stay light. Adding an algorithm is
one module, its tests and one registry line; see ``docs/algorithms.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Algorithm

from .registry import ALGOS, REGISTRY

__all__ = ["ALGOS", "REGISTRY", "algorithm_class", "build_algorithm"]


def algorithm_class(name: str) -> type["Algorithm"]:
    """The class registered as ``name`` (a KeyError for an unknown one; the config refuses those first)."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), cls)


def build_algorithm(cfg: "Config") -> "Algorithm":
    """The algorithm of ``cfg.fed.algo``, bound to ``cfg``."""
    return algorithm_class(cfg.fed.algo)(cfg)
