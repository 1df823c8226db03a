"""Where a rank sits: its MPI world, its node's memory, its torch threads and its log lines.

Imports neither torch nor mpi4py at module level, so the launcher can ask
before the heavy imports. ``run.py`` builds the :class:`World` once and hands
it to ``start.py`` and ``runtime.py``; they read the rest from here.
"""

from __future__ import annotations

import logging
import os
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .algorithms.registry import PEFT_ALGOS
from .errors import UserError
from .node import NodeLayout, node_layout, poll_until, single_process_layout, true_or_none

if TYPE_CHECKING:
    from .config import Config

#: Memory one rank needs at least with a small model: a client rank of the
#: offline default peaks at 0.35 GB of private memory (Private_Dirty, measured
#: on CPU, torch 2.14, with torch._dynamo and sympy deferred: lean.py; 0.42 GB
#: with both); 51 such ranks used 17.9 GB. See README, "Many ranks on one node".
RANK_MEMORY_FLOOR_GB = 0.35
#: What a rank of an algorithm that imports peft (the LoRA algorithms and LEGEND) needs on top: peft brings
#: transformers, torch._dynamo, sympy and torch.distributed.tensor (fedlora's ranks peaked at
#: 0.50 GB against 0.37 GB for sfprompt's, docs/experiments/memory/rank_memory.py 5 --algo ...).
PEFT_RANK_GB = 0.13


def rank_floor_gb(algo: str) -> float:
    """The memory check's floor per rank for ``--algo algo``: $SFPROMPT_RANK_GB where set (0: no check),
    else RANK_MEMORY_FLOOR_GB, plus PEFT_RANK_GB for an algorithm that imports peft."""
    if os.environ.get("SFPROMPT_RANK_GB"):
        try:
            return float(os.environ["SFPROMPT_RANK_GB"])
        except ValueError:
            raise UserError(f"SFPROMPT_RANK_GB={os.environ['SFPROMPT_RANK_GB']!r} must be a number of GB per rank "
                            "(0: no memory check)") from None
    return RANK_MEMORY_FLOOR_GB + (PEFT_RANK_GB if algo in PEFT_ALGOS else 0.0)


_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


@dataclass
class World:
    """Where this process sits: MPI communicator (None in one process), rank, size, and its node."""

    comm: Any
    rank: int
    size: int
    node: NodeLayout

    @property
    def single(self) -> bool:
        return self.comm is None or self.size == 1


def detect_world() -> World:
    """Initialise MPI only when a launcher started us; otherwise a one-process world."""
    if not any(v in os.environ for v in _MPI_ENV):
        tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
        if "SLURM_STEP_ID" in os.environ and tasks > 1:
            raise UserError(f"srun started {tasks} tasks but no MPI process manager is visible; "
                            "launch with srun --mpi=pmi2 (or pmix) or with mpirun")
        return World(None, 0, 1, single_process_layout())
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return World(comm, comm.Get_rank(), comm.Get_size(), node_layout(comm))


def agree(world: World, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; if it raised UserError anywhere, raise it everywhere."""
    result, error = None, None
    try:
        result = fn()
    except UserError as exc:
        error = str(exc)
    if world.comm is not None and world.size > 1:
        wait_for_all(world)
        errors = world.comm.allgather(error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)
    return result


def wait_for_all(world: World) -> None:
    """A barrier that waits as the transport does (:func:`~sfprompt_mpi.node.poll_until`): MPI's own
    collectives spin a core, so ranks waiting for rank 0's checks, or for the slowest rank's imports,
    would take CPU from it wherever the node has more ranks than CPUs."""
    request = world.comm.Ibarrier()
    poll_until(lambda: true_or_none(request.Test()), math.inf, world.node.spin_s)


def rank0_decides(world: World, fn: Callable[[], Any]) -> Any:
    """:func:`agree` on ``fn`` (which only rank 0 makes return something), then rank 0's answer on every rank."""
    value = agree(world, fn)
    return value if world.comm is None or world.size == 1 else world.comm.bcast(value, root=0)


def node_memory_check(world: World, algo: str) -> None:
    """Refuse, with one line, to start more ranks on a node than its memory can hold.

    The floor per rank is :func:`rank_floor_gb` of ``--algo algo`` ($SFPROMPT_RANK_GB where set:
    larger for big models, 0 to turn the check off). Runs before torch is imported, so a node that would run out of memory
    during start-up fails in a second instead of being OOM-killed minutes in.
    Each node's ranks compare the floor x their count with MemAvailable; the
    verdict is agreed by all ranks so no rank waits for a failed one."""
    error = None
    if world.comm is not None and world.size > 1:
        ranks_here, local_rank = world.node.local_size, world.node.local_rank
        available = _mem_available_gb()
        floor = rank_floor_gb(algo)
        need = ranks_here * floor
        if local_rank == 0 and available is not None and need > available:
            error = (f"{ranks_here} ranks on node {os.uname().nodename} need at least {need:.1f} GB "
                     f"({floor:g} GB each, SFPROMPT_RANK_GB) but only {available:.1f} GB is available; launch fewer "
                     f"ranks per node and give each several clients with --clients N (virtual clients)")
        errors = [e for e in world.comm.allgather(error) if e]
        if errors:
            raise UserError(errors[0])


def _mem_available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def client_hosts(num_clients: int, world_size: int) -> dict[int, list[int]]:
    """Client ids hosted by each client rank: contiguous, as even as possible."""
    ranks = max(1, world_size - 1)
    return {1 + h: list(range(h * num_clients // ranks, (h + 1) * num_clients // ranks)) for h in range(ranks)}


def setup_logging(cfg: Config, rank: int, log_dir: Path | None) -> None:
    level = cfg.run.log_level or ("INFO" if rank == 0 else "WARNING")
    fmt = logging.Formatter(f"[r{rank:02d}] %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(level)
    root.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / f"rank{rank:05d}.log")
        fh.setFormatter(logging.Formatter(f"%(asctime)s [r{rank:02d}] %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(min(logging.getLevelName(level), logging.INFO))
        root.addHandler(fh)


def torch_threads(cfg: Config, world: World, clients: int) -> int:
    """Torch threads for this rank: ``--threads``, or by default this node's CPUs shared by its ranks.

    The one-process reference run stands for the job with one rank per client
    (``mpiexec -n clients+1``) and takes the threads one rank of that job would
    get on this machine: results depend on the thread count (it splits the sums
    of matrix products), so by default the two agree bitwise, and so does any
    MPI run whose ranks come to the same count (ranks >= CPUs: one each)."""
    if cfg.run.threads:
        return cfg.run.threads
    node = NodeLayout(0, clients + 1, world.node.cpus) if world.single else world.node
    return node.threads_per_rank


def set_threads(cfg: Config, world: World, clients: int) -> int:
    """Give torch :func:`torch_threads` threads; -> that count."""
    import torch
    threads = torch_threads(cfg, world, clients)
    torch.set_num_threads(threads)
    return threads
