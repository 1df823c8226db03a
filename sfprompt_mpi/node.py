"""Where a rank sits on its node: how many ranks share the node and its CPUs.

Imports neither torch nor mpi4py, so the launcher can ask before the heavy
imports. Start-up computes the layout once (:func:`node_layout`); the memory
check, the thread count and the transport's way of waiting all read it, and
:func:`poll_until` is that way of waiting (the transport's, and the agreed setup stages').
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

#: How long a waiting rank spins before it naps (the transport's wait policy,
#: explained in ``comm/mpi.py``): briefly when ranks outnumber CPUs, longer
#: when each rank has a CPU of its own.
SPIN_S = 1e-3
DEDICATED_SPIN_S = 0.2
#: A nap's first and longest step.
_NAP_FIRST_S = 2e-5
_NAP_MAX_S = 1e-3

T = TypeVar("T")


def poll_until(test: Callable[[], T | None], deadline: float, spin_s: float = SPIN_S) -> T | None:
    """Call ``test`` until it returns something other than None or ``deadline``
    (``time.monotonic``) passes; None on timeout. Spins for ``spin_s``, then naps."""
    start = time.monotonic()
    nap = _NAP_FIRST_S
    while True:
        found = test()
        if found is not None:
            return found
        now = time.monotonic()
        if now >= deadline:
            return None
        if now - start < spin_s:
            os.sched_yield()
        else:
            time.sleep(min(nap, deadline - now))
            nap = min(2 * nap, _NAP_MAX_S)


def true_or_none(flag: bool) -> bool | None:
    """``flag`` in the form :func:`poll_until` waits on."""
    return True if flag else None


def my_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask: cgroups and srun binding included)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class NodeLayout:
    """This rank's place on its node."""

    local_rank: int
    local_size: int  # ranks on this node
    cpus: int        # distinct CPUs those ranks may run on, together

    @property
    def oversubscribed(self) -> bool:
        """More ranks than CPUs on the node: a waiting rank must give its CPU to others."""
        return self.local_size > self.cpus

    @property
    def spin_s(self) -> float:
        """How long a wait spins before it naps on this node."""
        return SPIN_S if self.oversubscribed else DEDICATED_SPIN_S

    @property
    def threads_per_rank(self) -> int:
        """CPUs per rank, at least one."""
        return max(1, self.cpus // self.local_size)


def wait_policy(layout: NodeLayout) -> str:
    """The wait policy in words, for the start-up log."""
    return f"waiting ranks {'nap after' if layout.oversubscribed else 'spin up to'} {_duration(layout.spin_s)}"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:g} ms" if seconds < 1 else f"{seconds:g} s"


def single_process_layout() -> NodeLayout:
    return NodeLayout(0, 1, len(my_cpus()))


def node_layout(comm: Any) -> NodeLayout:
    """The layout of the calling rank (collective over ``comm``, an mpi4py communicator)."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        masks = node.allgather(sorted(my_cpus()))
        return NodeLayout(node.Get_rank(), node.Get_size(), len(set().union(*map(set, masks))))
    finally:
        node.Free()
