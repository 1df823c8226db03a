"""Launching ``python -m sfprompt_mpi.run`` for tests: bounded, with the output kept.

Imported by ``tests/test_mpi_run.py`` (through importlib, like
``transport_conformance.py``), and run as a script for one reference run that
a flag cannot express:

    python tests/mpi/run_helpers.py --without ROUND:CLIENT [sfprompt_mpi.run flags...]

runs the single-process reference run with client CLIENT left out of the
selection of round ROUND, i.e. what an MPI run in which the server rejected
that client in that round should equal, and for a run whose ranks each get
SIGTERM after their Stopper is closed (what srun --kill-on-bad-exit does to
the ranks still running once one has exited):

    python tests/mpi/run_helpers.py --signal-on-the-way-out [sfprompt_mpi.run flags...]
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
LAUNCH_TIMEOUT_S = 240


@dataclass
class Launch:
    """One finished launch: the command, its exit code, stdout+stderr, and its wall time."""

    cmd: list[str]
    returncode: int
    output: str
    wall_s: float

    def report(self) -> str:
        """The command, exit code and output, for assertion messages."""
        return f"$ {' '.join(self.cmd)}\nexit code {self.returncode} after {self.wall_s:.1f} s\n{self.output}"


def launch(args: list[str], *, ranks: int | None = None, script: list[str] | None = None,
           timeout: float = LAUNCH_TIMEOUT_S, env: dict[str, str] | None = None) -> Launch:
    """``[mpiexec -n ranks] python -m sfprompt_mpi.run args`` (or ``python script args``), bounded.

    The child gets its own session, so on timeout the whole process group
    (mpiexec, its proxy and every rank) is killed and AssertionError carries
    the output so far: a hang fails the test instead of stalling the suite.
    """
    entry = script if script is not None else ["-m", "sfprompt_mpi.run"]
    if script is None and ranks is None:
        args = [*args, "--reference"]  # the one-process run, not ranks the command would start itself
    cmd = [sys.executable, *entry, *args]
    if ranks is not None:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    return run_bounded(cmd, timeout, env)


def python_run() -> list[str]:
    """``python -m sfprompt_mpi.run`` as a user types it: no launcher, no --reference."""
    return [sys.executable, "-m", "sfprompt_mpi.run"]


def run_bounded(cmd: list[str], timeout: float = LAUNCH_TIMEOUT_S, env: dict[str, str] | None = None) -> Launch:
    """Run ``cmd`` from the repository root with one thread per process, bounded.

    The child gets its own session, so on timeout the whole process group
    (mpiexec, its proxy and every rank) is killed and AssertionError carries
    the output so far.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout:.0f} s (killed); "
                             f"output so far:\n{out}") from None
    return Launch(cmd, proc.returncode, out, time.perf_counter() - t0)


def checkpoint_round(run_dir: Path) -> int:
    """The round a run directory's checkpoint holds (0: none yet, or being written)."""
    import json
    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def start_until_checkpoint(args: list[str], run_dir: Path, rnd: int, *, ranks: int | None = 3,
                           timeout: float = 150, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``mpiexec -n ranks python -m sfprompt_mpi.run ARGS`` (``ranks`` None: without mpiexec) in its
    own session and wait until the checkpoint of ``run_dir`` holds round ``rnd`` (or the job ends, or
    ``timeout``); -> the job."""
    cmd = [sys.executable, "-m", "sfprompt_mpi.run", *args]
    cmd = cmd if ranks is None else [str(MPIEXEC), "-n", str(ranks), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while checkpoint_round(run_dir) < rnd and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """``with reaped(job): ...`` kills the job's whole process group (mpiexec and every rank) on leaving
    if it still runs, so that a failed assertion inside leaves nothing behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(proc: subprocess.Popen, timeout: float) -> tuple[float, str]:
    """Wait for a job started by :func:`start_until_checkpoint` to end (inside :func:`reaped`);
    -> (seconds it took from now, its output)."""
    started = time.monotonic()
    proc.wait(timeout=timeout)
    return time.monotonic() - started, proc.stdout.read().decode(errors="replace")


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of MPI rank ``rank`` among the descendants of process ``launcher`` (mpiexec)."""
    parent, env = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env[int(entry.name)] = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
    family, grew = {launcher}, True
    while grew:
        kids = {p for p, pp in parent.items() if pp in family} - family
        family |= kids
        grew = bool(kids)
    return next((p for p in sorted(family) if f"PMI_RANK={rank}".encode() in env.get(p, [])), None)


def _run_without(round_client: str, argv: list[str]) -> int:
    """The reference run with one client dropped from one round's selection."""
    from sfprompt_mpi.algorithms.base import Algorithm
    from sfprompt_mpi.run import main

    rnd, cid = (int(x) for x in round_client.split(":"))
    select = Algorithm.select_clients

    def select_without(self: Algorithm, r: int, num_clients: int) -> list[int]:
        return [c for c in select(self, r, num_clients) if (r, c) != (rnd, cid)]

    Algorithm.select_clients = select_without
    return main(argv)


def _run_signalled_on_the_way_out(argv: list[str]) -> int:
    """``sfprompt_mpi.run``, each rank sending itself SIGTERM once its Stopper is closed, as srun
    --kill-on-bad-exit signals the ranks still running once one has exited non-zero."""
    from sfprompt_mpi.run import main
    from sfprompt_mpi.stopping import Stopper

    close = Stopper.close

    def close_then_signal(self: Stopper) -> None:
        close(self)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # a Python handler runs between bytecodes; the default action at once

    Stopper.close = close_then_signal
    return main(argv)


if __name__ == "__main__":
    from sfprompt_mpi.cli import end_process
    if len(sys.argv) >= 3 and sys.argv[1] == "--without":
        end_process(_run_without(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) >= 2 and sys.argv[1] == "--signal-on-the-way-out":
        end_process(_run_signalled_on_the_way_out(sys.argv[2:]))
    sys.exit(__doc__)
