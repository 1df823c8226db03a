"""Every core without a launcher: ``python -m sfprompt_mpi.run`` starting its own ranks.

Started without an MPI launcher, the job is the one-process reference run.
On a machine with several CPUs, mpi4py and an ``mpiexec``, the command
instead replaces itself with ``mpiexec -n W python -m sfprompt_mpi.run
ARGS``: a server and W-1 client ranks that together compute exactly the
reference run, so the run ends with bitwise the parameters ``--reference``
(one process) ends with. Three things make that so:

- W is chosen so that each rank gets the torch threads the reference run
  takes (``--threads``, or cores / (clients + 1); a matrix product's sums
  split over threads): W = min(clients + 1, cores / threads + 1);
- the ranks keep the reference run's defaults: 4 clients when ``--clients``
  is not given (an MPI run's default is one per client rank);
- the server serves one client per body pass, as it does in the reference
  run, where one client host asks for one pass at a time
  (``--server-batch`` batches several client ranks' passes, which rounds
  differently).

The config saved in the run directory is the command's own, so the same
command, ``--reference`` or ``--resume`` continue the run alike. The
command stays in one process under Slurm (start ranks with ``srun``), with
``--dry-run`` (the plan is checked in one process and names the ranks the
run would start), and where there is one CPU, no mpi4py, no ``mpiexec``, no
memory for the ranks, or too few clients to spread; rank 0 logs the choice.
``$SFPROMPT_LAUNCH_RANKS`` asks for a number of ranks (0: one process; the
reference's threads per rank still hold, or the command stays in one process).
``exec`` hands the process to ``mpiexec`` (MPICH's forwards SIGTERM and
SIGUSR1 to every rank), so stopping a run works as it does under a launcher.

Imports neither torch nor mpi4py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .node import my_cpus

if TYPE_CHECKING:
    from .config import Config

#: Set in the ranks a run started itself: how many there are.
LAUNCHED_ENV = "SFPROMPT_SELF_LAUNCHED"
#: Clients of a one-process run without ``--clients`` (an MPI run's default is one per client rank).
REFERENCE_CLIENTS = 4
_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


@dataclass(frozen=True)
class LaunchPlan:
    """How ``python -m sfprompt_mpi.run`` runs: ``ranks`` > 0 starts that many with ``mpiexec``,
    0 runs in this process; ``why`` is the choice in words (logged by rank 0)."""

    ranks: int
    why: str
    mpiexec: str = ""


def self_launched() -> int:
    """Ranks of the run that started itself, in one of its ranks; else 0."""
    try:
        return int(os.environ.get(LAUNCHED_ENV, "0") or 0)
    except ValueError:
        return 0


def plan_ranks(cfg: Config, cpus: int, mem_gb: float | None, floor_gb: float,
               want: int | None = None) -> tuple[int, str]:
    """Ranks that compute the reference run of ``cfg`` on ``cpus`` CPUs (0 if none fit), and why;
    ``want``: that many ranks (``$SFPROMPT_LAUNCH_RANKS``), if they keep the reference's threads.

    Pure: the same inputs give the same plan (tested)."""
    clients = cfg.fed.clients or REFERENCE_CLIENTS
    threads = cfg.run.threads or max(1, cpus // (clients + 1))
    ranks = min(clients + 1, cpus // threads + 1) if want is None else min(want, clients + 1)
    if mem_gb is not None and floor_gb > 0 and ranks * floor_gb > mem_gb:
        ranks = int(mem_gb // floor_gb)
        if ranks < 3 or (cfg.run.threads or max(1, cpus // ranks)) != threads:
            return 0, (f"{mem_gb:.1f} GB available holds too few ranks of {floor_gb:g} GB at {threads} torch "
                       f"thread(s) each")
    if ranks < 3:
        return 0, (f"{cpus} CPU(s) at {threads} torch thread(s) for {clients} client(s): a second client rank "
                   "would not run at the same time")
    if (cfg.run.threads or max(1, cpus // ranks)) != threads:  # what world.torch_threads gives each rank
        return 0, f"{ranks} ranks would not get the {threads} torch thread(s) of the one-process run"
    return ranks, f"{ranks - 1} client ranks x {threads} torch thread(s) on {cpus} CPU(s)"


def plan_launch(cfg: Config) -> LaunchPlan:
    """This command's plan: start ranks, or run here (and why)."""
    if cfg.run.reference:
        return LaunchPlan(0, "one process (--reference)")
    if "SLURM_JOB_ID" in os.environ:
        return LaunchPlan(0, "one process: under Slurm, start ranks with srun (see jobs/)")
    if importlib.util.find_spec("mpi4py") is None:
        return LaunchPlan(0, "one process: mpi4py is not installed (pip install -e '.[mpi]' uses every core)")
    mpiexec = _mpiexec()
    if mpiexec is None:
        return LaunchPlan(0, "one process: no mpiexec found (pip install -e '.[mpi]' uses every core)")
    from .world import _mem_available_gb, rank_floor_gb
    floor = rank_floor_gb(cfg.fed.algo)
    try:
        want = int(os.environ["SFPROMPT_LAUNCH_RANKS"]) if os.environ.get("SFPROMPT_LAUNCH_RANKS") else None
    except ValueError:
        raise UserError(f"SFPROMPT_LAUNCH_RANKS={os.environ['SFPROMPT_LAUNCH_RANKS']!r} must be a number of "
                        "ranks (0: one process)") from None
    ranks, why = plan_ranks(cfg, len(my_cpus()), _mem_available_gb(), floor, want)
    if not ranks:
        return LaunchPlan(0, f"one process: {why}")
    if cfg.run.dry_run:
        return LaunchPlan(0, f"one process for --dry-run; the run would start mpiexec -n {ranks} ({why})")
    return LaunchPlan(ranks, f"started its own {ranks} ranks with mpiexec ({why}): bitwise the one-process "
                             "result; --reference runs in one process", mpiexec)


def _mpiexec() -> str | None:
    """``$SFPROMPT_MPIEXEC``, else the one beside this Python (the mpich wheel's), else the one on PATH."""
    env = os.environ.get("SFPROMPT_MPIEXEC", "").strip()
    if env:
        return env
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def under_launcher() -> bool:
    """Whether an MPI launcher started this process."""
    return any(v in os.environ for v in _MPI_ENV)


def exec_ranks(plan: LaunchPlan, argv: list[str]) -> None:
    """Replace this process with ``mpiexec -n ranks python -m sfprompt_mpi.run argv``; does not return."""
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, **{LAUNCHED_ENV: str(plan.ranks)})
    cmd = [plan.mpiexec, "-n", str(plan.ranks), sys.executable, "-m", "sfprompt_mpi.run", *argv]
    os.execve(plan.mpiexec, cmd, env)
