"""The one way every command line ends: ``run``, ``analyze``, ``cost``, ``table`` and ``bench``.

Each CLI's ``main(argv)`` hands its work to :func:`main_guard`, which turns
the outcomes that are no bug into exit codes:

- :class:`~sfprompt_mpi.errors.UserError`: one line ``error: ...`` on stderr
  (printed by rank 0 only), exit code 2;
- :class:`~sfprompt_mpi.errors.RunStopped`: one line ``[rNN] stopped: ...``,
  exit code 3 (under MPI the whole job is aborted with 3, so that no rank is
  left waiting);
- KeyboardInterrupt under an MPI-aware command: ``[rNN] interrupted``, 130.

Any other exception is a bug or a fault: in one process it keeps its
traceback; under MPI it aborts the whole job with that rank's error.

Each CLI's ``__main__`` then leaves through :func:`end_process`, which skips
the interpreter's teardown (0.6-1 s of CPU in a process that imported torch,
0.13 s once its imports are frozen) in one process and on each rank of several.
"""

from __future__ import annotations

import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from .errors import EXIT_RUN_STOPPED, EXIT_USER_ERROR, RunStopped, UserError


@dataclass
class Where:
    """Where the command runs; ``main_guard``'s work may fill it in once it knows (e.g. after MPI starts)."""

    rank: int = 0
    mpi: bool = False  # several MPI ranks: a fault on one must end them all
    interrupts: bool = False  # answer Ctrl-C with one line and 130 instead of a traceback


def main_guard(work: Callable[[list[str] | None], int], argv: list[str] | None,
               where: Where | None = None) -> int:
    """``work(argv)`` -> its exit code, with user errors, stops and faults ended as the module doc says."""
    where = where or Where()
    try:
        return _decided(work(argv), where)
    except UserError as exc:
        if where.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return _decided(EXIT_USER_ERROR, where)
    except RunStopped as exc:  # e.g. too few clients survived a round: one line, no traceback
        sys.stderr.write(f"[r{where.rank:02d}] stopped: {exc}\n")
        sys.stderr.flush()
        if where.mpi:
            _comm_world().Abort(EXIT_RUN_STOPPED)  # a dropped rank may still be busy: end it too
        return EXIT_RUN_STOPPED
    except KeyboardInterrupt:
        if not where.interrupts:
            raise
        print(f"[r{where.rank:02d}] interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - any fault must end the whole job
        if not where.mpi:
            raise
        return abort_job(where.rank, exc, _comm_world())


def _decided(code: int, where: Where) -> int:
    """``code``; a rank of several leaving with a non-zero one ignores SIGTERM and SIGUSR1 from here:
    srun --kill-on-bad-exit signals the ranks still running once one exits non-zero, and each must
    still end with the code the job agreed on (2 or 4), not 143."""
    if code and where.mpi:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    return code


def abort_job(rank: int, exc: BaseException, comm: Any) -> int:
    """Print this rank's fault once, with its traceback, and abort the whole MPI job (exit code 1)."""
    sys.stderr.write(f"[r{rank:02d}] failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    sys.stderr.flush()
    comm.Abort(1)
    return 1


def end_process(code: int) -> NoReturn:
    """Leave the process with exit code ``code`` as ``sys.exit`` would, less the interpreter's teardown.

    Tearing down a process that imported torch (its modules freed one by one, every object collected)
    takes 0.6-1 s of CPU. A command's files are closed when its ``main`` returns, so this runs the
    exit handlers (logging, h5py, multiprocessing), finalises MPI, flushes the standard streams and
    ends with ``os._exit``. A rank of several ends with the C library's ``exit`` instead, which runs
    the C libraries' exit handlers: without MPICH's, after ``MPI_Finalize``, ``mpiexec`` reports some
    ranks as killed (exit code 9) and jobs leave shared-memory segments in ``/dev/shm``. It is called
    holding the GIL, so no other Python thread runs while those handlers do. Where a thread other than
    the main one still runs, the process exits the usual way, which waits for that thread.
    """
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    mpi = sys.modules.get("mpi4py.MPI")
    mpi = mpi if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() else None
    several = mpi is not None and mpi.COMM_WORLD.Get_size() > 1
    atexit._run_exitfuncs()
    if mpi is not None:
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    if several:
        import ctypes
        ctypes.PyDLL(None).exit(code)  # PyDLL: the call keeps the GIL
    os._exit(code)


def _comm_world() -> Any:
    from mpi4py import MPI
    return MPI.COMM_WORLD
