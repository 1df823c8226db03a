"""Stopping a run cleanly between rounds: signals, a client rank's notice, and the time budget.

Clusters end long jobs from outside: Slurm sends SIGTERM at the time limit
or on preemption (and, with ``sbatch --signal=USR1@N``, SIGUSR1 N seconds
before the limit), and a user may signal any one rank. The design:

- The handler of SIGTERM and SIGUSR1 only records the request (the first
  one; a second signal during the stop changes nothing, so it cannot tear
  a checkpoint or an HDF5 file). On a client rank it also posts a
  one-message notice to rank 0 with a non-blocking send on a communicator
  of its own (a duplicate of the world made at setup). Python runs signal
  handlers in the main thread between bytecodes, never inside an MPI call,
  and the notice travels on its own communicator, so it cannot interleave
  with the transport's messages.
- The server asks :meth:`Stopper.stop_before` once per round, when it is
  about to start the next round (or the first one). A request (its own
  signal, or a notice it finds with ``Iprobe``) or a time budget that the
  next round would overrun makes it finish the round in progress instead:
  aggregate, evaluate, checkpoint, log, then STOP to every host. Results
  stay bitwise those of an uninterrupted run, and the stop is bounded by
  one round.
- Every rank then exits with :data:`~sfprompt_mpi.errors.EXIT_CONTINUE`
  (4, "stopped to be continued"), rank 0 after one line that says where it
  stopped and how it continues; the job scripts requeue on 4.

The time budget: ``--time-budget SECONDS`` from the start of the process,
or by default under Slurm the job's end time (``$SLURM_JOB_END_TIME``, else
``squeue -o %e``). The server does not start a round unless
``now + 1.25 x (longest round so far) + 5 s`` is before the deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_NOTICE_TAG = 0x5709
#: What the server keeps free after the last round it starts: a quarter of a round and this many seconds.
ROUND_SAFETY, STOP_MARGIN_S = 1.25, 5.0


class Stopper:
    """Whether the server should stop after the round in progress, and why.

    ``comm``: a communicator of its own (``COMM_WORLD.Dup()``) for client
    ranks' notices, or None in one process; ``deadline``: a time.monotonic()
    value the run must end by, or None.
    """

    def __init__(self, rank: int = 0, comm: Any = None, deadline: float | None = None) -> None:
        self.rank = rank
        self.comm = comm
        self.deadline = deadline
        self.reason: str | None = None
        self._notice: Any = None
        self._previous: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------
    def install(self) -> "Stopper":
        """Handle SIGTERM and SIGUSR1 from now on (main thread only; elsewhere a no-op)."""
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread (e.g. a run inside a test's thread)
            pass
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:
            sys.stderr.write(f"[r{self.rank:02d}] {name}: already stopping ({self.reason}); it changes nothing\n")
            return
        self.reason = f"{name} to rank {self.rank}"
        sys.stderr.write(f"[r{self.rank:02d}] {name}: the run stops after the round in progress\n")
        if self.rank != 0 and self.comm is not None:
            self._notice = self.comm.isend(name, dest=0, tag=_NOTICE_TAG)

    def attach(self, comm: Any, deadline: float | None) -> "Stopper":
        """Set the notice communicator and the deadline once MPI and the config are set up; a
        client rank signalled before then sends its notice now."""
        self.comm, self.deadline = comm, deadline
        if self.reason is not None and self.rank != 0 and comm is not None and self._notice is None:
            self._notice = comm.isend(self.reason.split()[0], dest=0, tag=_NOTICE_TAG)
        return self

    def request(self, reason: str) -> None:
        """Ask for a stop without a signal (tests, drills)."""
        self.reason = self.reason or reason

    # -- the server's question -----------------------------------------------------
    def stop_before(self, rnd: int, longest_round_s: float) -> str | None:
        """Why round ``rnd`` should not start, or None: a request, or a deadline it would overrun."""
        self._read_notices()
        if self.reason is not None:
            return self.reason
        if self.deadline is not None and longest_round_s > 0:
            left = self.deadline - time.monotonic()
            if left < ROUND_SAFETY * longest_round_s + STOP_MARGIN_S:
                return (f"time budget: {max(left, 0):.0f} s left, a round takes up to {longest_round_s:.0f} s "
                        f"(--time-budget)")
        return None

    def _read_notices(self) -> None:
        if self.comm is None or self.rank != 0:
            return
        from mpi4py import MPI
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_NOTICE_TAG, status=status):
            name = self.comm.recv(source=status.Get_source(), tag=_NOTICE_TAG)
            self.reason = self.reason or f"{name} to rank {status.Get_source()}"

    def close(self) -> None:
        """Restore the handlers; take in notices nobody read and finish this rank's own.

        Once a stop was asked for, the handlers stay: the process is on its way to exit code 4, and
        a repeated signal arriving during that exit must not kill it with another code."""
        if self.reason is None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()
        self._read_notices()
        if self._notice is not None:
            self._notice.wait()  # a tiny eager message: done once rank 0 took it in or buffered it
            self._notice = None


def slurm_deadline() -> float | None:
    """The Slurm job's end time as a time.monotonic() value, or None outside Slurm or without a limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    if not end.isdigit():
        try:
            out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            end = str(int(time.mktime(time.strptime(out.splitlines()[0], "%Y-%m-%dT%H:%M:%S"))))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            log.warning("could not read the Slurm job's end time (squeue -j %s -o %%e); no time budget", job)
            return None
    return time.monotonic() + (int(end) - time.time())


def run_deadline(budget_s: float, started: float) -> float | None:
    """``--time-budget``: > 0 seconds from ``started``; 0 the Slurm job's end time (if any); < 0 none."""
    if budget_s > 0:
        return started + budget_s
    return slurm_deadline() if budget_s == 0 else None
