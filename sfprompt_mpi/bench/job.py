"""Running the real job for a benchmark, with its transport timed per round.

``python -m sfprompt_mpi.bench _job --report FILE -- RUN_FLAGS...`` runs
``python -m sfprompt_mpi.run RUN_FLAGS...`` in this process (under mpiexec or
not) with one addition: ``run_job`` wraps the transport it builds in
:class:`~sfprompt_mpi.comm.wrappers.Timed` reporting to a :class:`RoundClock`.
Each rank splits each round's wall time into

- ``send_s``: inside ``Transport.send`` (header packed, payload staged and
  posted; MPI sends do not wait for the receiver),
- ``wait_s``: inside ``Transport.recv`` until a message's header arrived
  (idle: the peer is still computing, or the message is queued behind others),
- ``payload_s``: from a header's arrival until its payload is in a tensor
  (the transfer itself),
- ``compute_s``: the rest (model compute, optimiser, metrics, checkpoints).

A round is delimited by the START messages: on the server from one START
sent to the next (STOP after the last), on a client host from one START
received to the next, so the wait for the server's aggregation and
evaluation counts in the round it ends. Rank 0 writes every rank's rounds and
its peak and final memory to the report file as JSON.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

PARTS = ("send_s", "wait_s", "payload_s")


class RoundClock:
    """Per-round time accumulators of one rank (a :class:`~sfprompt_mpi.comm.wrappers.Clock`)."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, float]] = {}
        self.current: int | None = None
        self.started = 0.0

    def add(self, part: str, seconds: float) -> None:
        if self.current is not None:
            self.rounds[self.current][part] += seconds

    def message(self, h: Any, now: float) -> None:
        """Header ``h`` passed through the transport at ``now``: START and STOP delimit rounds."""
        from ..comm.protocol import Kind
        if h.kind == Kind.START or h.kind == Kind.STOP:
            self.boundary(h.kind == Kind.START, h.round, now)

    def boundary(self, kind_start: bool, rnd: int, now: float) -> None:
        """A START (of round ``rnd``, any attempt) or STOP passed through the transport at ``now``."""
        if kind_start and rnd == self.current:
            return  # the server sends one START per host (and again when it retries the round)
        if self.current is not None:
            r = self.rounds[self.current]
            r["wall_s"] = now - self.started
            r["compute_s"] = r["wall_s"] - sum(r[p] for p in PARTS)
        self.current = rnd if kind_start else None
        self.started = now
        if kind_start:
            self.rounds[rnd] = {p: 0.0 for p in PARTS}


def private_mb() -> float | None:
    """This process's private (unshared) resident memory now, in MB."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
        return kb / 1024
    except (OSError, ValueError):
        return None


def job_main(argv: list[str]) -> int:
    """``_job --report FILE -- RUN_FLAGS``: the run, timed; -> its exit code."""
    if len(argv) < 3 or argv[0] != "--report" or argv[2] != "--":
        print("usage: python -m sfprompt_mpi.bench _job --report FILE -- RUN_FLAGS...", file=sys.stderr)
        return 2
    report_path, run_argv = Path(argv[1]), argv[3:]
    from ..run import main
    from .common import under_mpi

    clock = RoundClock()
    t0 = time.perf_counter()
    code = main(run_argv, clock=clock)
    mine = {"rounds": {str(k): v for k, v in clock.rounds.items()}, "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "private_mb": private_mb(),
            "exit": code}
    if under_mpi():
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        ranks = comm.gather(mine, root=0)
        if comm.Get_rank() != 0:
            return code
    else:
        ranks = [mine]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({"argv": run_argv, "world": len(ranks), "ranks": ranks}, indent=1) + "\n")
    return code
