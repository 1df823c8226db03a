"""Every ``--algo`` in one launch: ``python tests/mpi/all_algos.py BASE [flags...]``.

Runs ``sfprompt_mpi.run.main`` once per algorithm, in this process (or in
this MPI job, under ``mpiexec``), with ``--run-dir BASE/<algo>``, so that the
eight runs share one interpreter start-up. Exits with the first non-zero
exit code.
"""

from __future__ import annotations

import sys

from sfprompt_mpi.config import ALGOS
from sfprompt_mpi.cli import end_process
from sfprompt_mpi.run import main


def run_all(base: str, flags: list[str]) -> int:
    for algo in ALGOS:
        code = main([*flags, "--algo", algo, "--run-dir", f"{base}/{algo}"])
        if code:
            return code
    return 0


if __name__ == "__main__":
    end_process(run_all(sys.argv[1], sys.argv[2:]))  # as python -m sfprompt_mpi.run ends
