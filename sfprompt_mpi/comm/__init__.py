"""Point-to-point tensor messages between ranks (see :mod:`.protocol`).

Roles receive a :class:`~.protocol.Transport`; ``runtime.py`` builds one with
:func:`build_transport` (or a loopback hub) and wraps it (:mod:`.wrappers`:
byte counts, timing, injected faults) before handing it over. MPI is imported only when an MPI transport is built,
so the single-process reference run and the model code never start MPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from mpi4py import MPI

    from ..node import NodeLayout
    from .protocol import Transport

TRANSPORTS = ("mpi", "gloo", "nccl")


def build_transport(kind: str, comm: "MPI.Comm", device: torch.device | str | None = None,
                    layout: "NodeLayout | None" = None) -> "Transport":
    """The transport named by ``--transport`` over ``comm`` (collective over it).

    ``mpi`` carries everything through MPI; ``gloo`` and ``nccl`` keep headers
    on MPI and move payloads through torch.distributed. Received payloads are
    placed on ``device``. ``layout`` (this rank's node, found collectively when
    None) decides how waiting ranks share the CPUs.
    """
    if kind == "mpi":
        from .mpi import MPITransport
        return MPITransport(comm, device=device, layout=layout)
    if kind in ("gloo", "nccl"):
        from .torch_dist import TorchDistTransport
        return TorchDistTransport(comm, kind, device, layout)
    raise UserError(f"unknown transport {kind!r}: use one of {', '.join(TRANSPORTS)}")
