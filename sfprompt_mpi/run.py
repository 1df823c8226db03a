"""The main job: config -> transport -> rank 0 Server, other ranks ClientHosts.

Launch:
    python -m sfprompt_mpi.run                                 # every core (starts mpiexec itself)
    python -m sfprompt_mpi.run --reference                     # reference run, one process
    mpirun -n 5 python -m sfprompt_mpi.run --clients 20        # 1 server + 4 client ranks
    srun --mpi=pmi2 -n 51 python -m sfprompt_mpi.run --config configs/paper/cifar10_iid.toml
    python -m sfprompt_mpi.run --resume runs/<id>              # continue an interrupted run

Without an MPI launcher the command starts its own ranks with mpiexec on
every core where it can (launch.py): bitwise the result of the reference
run, in which the server and one client host run as two threads of one
process over the loopback transport (``--reference``): the same code and
messages as an MPI run. User mistakes end with one line and exit code 2 on every rank; any
other failure on any rank aborts the whole MPI job with that rank's error.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # before anything heavy is imported

import dataclasses
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING, Any

from .cli import Where, end_process, main_guard
from .errors import EXIT_USER_ERROR, UserError
from .launch import exec_ranks, plan_launch, self_launched, under_launcher
from .stopping import Stopper
from .world import detect_world, node_memory_check

if TYPE_CHECKING:
    from .config import Config


#: Settings that say how a run is managed, not what it computes: a run continued with other values
#: of these is still the same run.
RUN_MANAGEMENT = ("run_dir", "resume", "log_level", "dry_run", "time_budget", "reference")


def resolve_config(argv: list[str] | None, rank: int = 0) -> Config:
    """CLI (+ --config), or for --resume the run's own config.toml with CLI flags on top.

    ``--run-dir DIR`` naming a run directory that holds a run of the same config
    continues it as ``--resume DIR`` would (a requeued job runs its command
    again); one of another config is refused with one line. Rank ``rank`` 0 warns
    when an explicit ``--resume`` makes a ``--config`` file of no effect."""
    # imported here so that MPI starts (detect_world) before argparse and the config machinery load
    from .config import build_parser, config_from_dict, flags_given, load_toml, parse_config
    cfg = parse_config(argv)
    args = build_parser().parse_args(argv)
    if cfg.run.resume and args.config and rank == 0:
        sys.stderr.write(f"warning: --config {args.config} is ignored with --resume: the run continues with its "
                         f"own {Path(cfg.run.resume) / 'config.toml'} (flags given still apply)\n")
    if not cfg.run.resume and cfg.run.run_dir and (Path(cfg.run.run_dir) / "config.toml").is_file():
        _check_same_run(cfg, Path(cfg.run.run_dir))
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=cfg.run.run_dir))
    if not cfg.run.resume:
        return cfg
    run_dir = Path(cfg.run.resume)
    saved = run_dir / "config.toml"
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.toml)")
    values = load_toml(saved)
    for section, flags in flags_given(args).items():
        values.setdefault(section, {}).update(flags)
    # how this run is managed is the command's, not the first command's (e.g. its --time-budget)
    values.setdefault("run", {}).update({k: getattr(cfg.run, k) for k in RUN_MANAGEMENT})
    values["run"].update(resume=str(run_dir), run_dir=str(run_dir))
    return dataclasses.replace(config_from_dict(values), given=cfg.given)


def _check_same_run(cfg: Config, run_dir: Path) -> None:
    """Refuse, with one line, to continue ``run_dir`` with a config other than its own."""
    from .config import config_from_dict, load_toml
    saved = config_from_dict(load_toml(run_dir / "config.toml")).to_dict()
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if key not in RUN_MANAGEMENT and saved[section][key] != value:
                raise UserError(f"run directory {run_dir} holds a run of another config ({section}.{key} is "
                                f"{saved[section][key]!r} there, {value!r} here); continue it with --resume "
                                f"{run_dir} (its own config.toml, flags on top) or choose another --run-dir")


def cli(argv: list[str] | None = None, started: float | None = None) -> int:
    """The command line: this process, or, without a launcher, every core (:mod:`.launch`).

    The config is resolved here first, so a user error is one line and exit code 2 before any
    rank starts or anything is written; ``exec`` hands a launched run to ``mpiexec``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = None
    if not under_launcher() and not self_launched():
        try:
            plan = plan_launch(resolve_config(argv))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        if plan.ranks:
            exec_ranks(plan, argv)
    return main(argv, started, note=plan.why if plan else "")


def main(argv: list[str] | None = None, started: float | None = None, clock: Any = None, note: str = "") -> int:
    """``started``: time.monotonic() when the process began (for the "setup took" line);
    ``clock``: a :class:`~sfprompt_mpi.comm.wrappers.Clock` that times the transport (benchmarks);
    ``note``: how the command chose to run (:func:`cli`), logged by rank 0."""
    started = time.monotonic() if started is None else started
    if self_launched():
        note = (f"python -m sfprompt_mpi.run started its own {self_launched()} ranks with mpiexec: bitwise the "
                f"one-process result (one client per body pass, as there); --reference runs in one process")
    where = Where(interrupts=True)

    def job(argv: list[str] | None) -> int:
        world = detect_world()
        where.rank, where.mpi = world.rank, not world.single
        # From here SIGTERM/SIGUSR1 ask the run to stop after its round in progress (stopping.py); a
        # rank that fails meanwhile ends with its own exit code, not 143 when srun signals the others.
        stopper = Stopper(world.rank).install()
        if world.rank != 0:  # only rank 0 fetches pretrained weights; the others read its cache
            os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            cfg = resolve_config(argv, world.rank)
            node_memory_check(world, cfg.fed.algo)
            from .start import run_job  # heavy imports (torch, timm) only after argument checks
            return run_job(cfg, world, started, clock, stopper, note=note)
        finally:
            stopper.close()

    return main_guard(job, argv, where)


if __name__ == "__main__":
    end_process(cli(started=_STARTED))
