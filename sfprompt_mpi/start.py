"""Starting a run on a rank, before torch: stop handling, the lean imports, a dry run's other ranks.

Every setup stage is *agreed* (``world.agree``): each rank runs it, the ranks exchange their errors,
and if any rank failed every rank raises the same UserError, so a bad config, a missing dataset or
a corrupt checkpoint ends the job with one line and exit code 2 everywhere instead of a hang.

A dry run's ranks other than 0 only wait for rank 0's checks and plan, so they return here without
importing torch (about 3 s of CPU and 0.3 GB each: most of a dry run's cost on a node of many
ranks). Every other rank defers what a run never uses (``sfprompt_mpi.lean``) and goes on in
``runtime.py``.
"""

from __future__ import annotations

import importlib
import threading
import time
from typing import TYPE_CHECKING

from .stopping import Stopper, run_deadline
from .world import World, rank0_decides, setup_logging

if TYPE_CHECKING:
    from .comm.wrappers import Clock
    from .config import Config


def run_job(cfg: Config, world: World, started: float | None = None, clock: Clock | None = None,
            stopper: Stopper | None = None, note: str = "") -> int:
    """Run (or dry-run) the configured job on this rank; -> exit code (0, or EXIT_CONTINUE after a stop).

    ``started``: time.monotonic() when the process began, for the setup-time log line;
    ``clock``: where the transport's time goes, when given (the benchmarks); ``stopper``: this
    process's stop requests (installed by the caller), else one installed here; ``note``: how the
    command chose to run (one process, or ranks it started itself), logged by rank 0."""
    started = time.monotonic() if started is None else started
    threading.current_thread().name = f"r{world.rank:02d}"
    setup_logging(cfg, world.rank, None)
    own = stopper is None
    stopper = stopper or Stopper(world.rank).install()
    stopper.attach(None if world.single else world.comm.Dup(),
                   run_deadline(cfg.run.time_budget, started) if world.rank == 0 else None)
    try:
        if cfg.run.dry_run and world.rank != 0:
            rank0_decides(world, lambda: None)  # as runtime.run_rank's first step: rank 0's checks end us too
            return 0
        from .algorithms.registry import PEFT_ALGOS
        from .lean import defer_imports, importing_for_good
        with importing_for_good():
            defer_imports()  # 2 s of CPU and 0.1 GB less per rank (lean.py)
            from .runtime import run_rank
            if cfg.fed.algo in PEFT_ALGOS:  # its model's LoRA: peft and transformers, 1 s of CPU less here
                importlib.import_module("peft")
        return run_rank(cfg, world, started, clock, stopper, note)
    finally:
        if own:
            stopper.close()
