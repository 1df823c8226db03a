"""Running the real job for a benchmark, with its transport timed per round.

``python -m sfprompt_mpi.bench _job --report FILE -- RUN_FLAGS...`` runs
``python -m sfprompt_mpi.run RUN_FLAGS...`` in this process (under mpiexec or
not) with one addition: the transport that ``run_job`` builds is timed. Each
rank splits each round's wall time into

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
#: A header's round field may carry a retry attempt above this stride; the round is the remainder.
_ROUND_STRIDE = 1 << 32


class RoundClock:
    """Per-round time accumulators of one rank."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, float]] = {}
        self.current: int | None = None
        self.started = 0.0

    def add(self, part: str, seconds: float) -> None:
        if self.current is not None:
            self.rounds[self.current][part] += seconds

    def boundary(self, kind_start: bool, rnd: int, now: float) -> None:
        """A START (of round ``rnd``) or STOP passed through the transport at ``now``."""
        rnd %= _ROUND_STRIDE
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


def instrument(transport: Any, clock: RoundClock) -> Any:
    """Time ``transport``'s send, recv and payload receive into ``clock``. In place."""
    from ..comm.protocol import Kind
    send, recv = transport.send, transport.recv
    inner_payload = getattr(transport, "_recv_payload", None)
    spent = {"payload": 0.0}

    def timed_send(dest: int, header: Any, payload: Any = None) -> None:
        t0 = time.perf_counter()
        send(dest, header, payload)
        t1 = time.perf_counter()
        clock.add("send_s", t1 - t0)
        if header.kind in (Kind.START, Kind.STOP):
            clock.boundary(header.kind == Kind.START, header.round, t1)

    def timed_payload(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner_payload(*args, **kwargs)
        finally:
            spent["payload"] += time.perf_counter() - t0

    def timed_recv(*args: Any, **kwargs: Any) -> Any:
        spent["payload"] = 0.0
        t0 = time.perf_counter()
        msg = recv(*args, **kwargs)
        t1 = time.perf_counter()
        clock.add("payload_s", spent["payload"])
        clock.add("wait_s", t1 - t0 - spent["payload"])
        if msg.header.kind in (Kind.START, Kind.STOP):
            clock.boundary(msg.header.kind == Kind.START, msg.header.round, t1)
        return msg

    transport.send, transport.recv = timed_send, timed_recv
    if inner_payload is not None:
        transport._recv_payload = timed_payload
    return transport


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
    import sfprompt_mpi.comm as comm_pkg
    from ..run import main
    from .common import under_mpi

    clock = RoundClock()
    build = comm_pkg.build_transport

    def build_timed(*args: Any, **kwargs: Any) -> Any:
        return instrument(build(*args, **kwargs), clock)

    comm_pkg.build_transport = build_timed  # run_job imports it from the package at call time
    t0 = time.perf_counter()
    code = main(run_argv)
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
