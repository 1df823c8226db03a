"""The main job: config -> transport -> rank 0 Server, other ranks ClientHosts.

Launch:
    python -m sfprompt_mpi.run                                 # reference run, one process
    mpirun -n 5 python -m sfprompt_mpi.run --clients 20        # 1 server + 4 client ranks
    srun --mpi=pmi2 -n 51 python -m sfprompt_mpi.run --config configs/paper/cifar10_iid.toml
    python -m sfprompt_mpi.run --resume runs/<id>              # continue an interrupted run

Without an MPI launcher the server and one client host run as two threads of
one process over the loopback transport: the same code and messages as an
MPI run. User mistakes end with one line and exit code 2 on every rank; any
other failure on any rank aborts the whole MPI job with that rank's error.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict, load_toml, parse_config, build_parser, FIELDS
from .errors import EXIT_USER_ERROR, UserError

log = logging.getLogger("sfprompt_mpi")

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


@dataclass
class World:
    """Where this process sits: MPI communicator (None in one process), rank, size."""

    comm: Any
    rank: int
    size: int

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
        return World(None, 0, 1)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return World(comm, comm.Get_rank(), comm.Get_size())


def client_hosts(num_clients: int, world_size: int) -> dict[int, list[int]]:
    """Client ids hosted by each client rank: contiguous, as even as possible."""
    ranks = max(1, world_size - 1)
    return {1 + h: list(range(h * num_clients // ranks, (h + 1) * num_clients // ranks)) for h in range(ranks)}


def resolve_config(argv: list[str] | None) -> Config:
    """CLI (+ --config), or for --resume the run's own config.toml with CLI flags on top."""
    cfg = parse_config(argv)
    if not cfg.run.resume:
        return cfg
    run_dir = Path(cfg.run.resume)
    saved = run_dir / "config.toml"
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.toml)")
    values = load_toml(saved)
    args = build_parser().parse_args(argv)
    for name, (section, _) in FIELDS.items():
        if getattr(args, name) is not None and name not in ("resume", "run_dir"):
            values.setdefault(section, {})[name] = getattr(args, name)
    values.setdefault("run", {}).update(resume=str(run_dir), run_dir=str(run_dir))
    return config_from_dict(values)


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


def set_threads(cfg: Config, world: World) -> int:
    import torch
    threads = cfg.run.threads
    if threads == 0:
        local = world.size
        if world.comm is not None:
            from mpi4py import MPI
            local = world.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def main(argv: list[str] | None = None) -> int:
    world = World(None, 0, 1)
    try:
        world = detect_world()
        cfg = resolve_config(argv)
        from .runtime import run_job  # heavy imports (torch, timm) only after argument checks
        return run_job(cfg, world)
    except UserError as exc:
        if world.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"[r{world.rank:02d}] interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - any fault must end the whole job
        if world.single:
            raise
        sys.stderr.write(f"[r{world.rank:02d}] failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        sys.stderr.flush()
        world.comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
