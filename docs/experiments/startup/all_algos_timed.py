"""Every ``--algo`` in one process, as ``tests/mpi/all_algos.py`` runs them, with each run's wall and CPU time.

    python docs/experiments/startup/all_algos_timed.py BASE [run flags...]

Compare the flags of ``tests/test_algos.py`` with and without ``--devices jetson`` to see what
the simulated clock's set-up (FLOP and memory counts on the meta device) costs per run.
"""

from __future__ import annotations

import sys
import time

from sfprompt_mpi.config import ALGOS
from sfprompt_mpi.run import main


def timed(base: str, flags: list[str]) -> None:
    for algo in ALGOS:
        wall, cpu = time.perf_counter(), time.process_time()
        code = main([*flags, "--algo", algo, "--run-dir", f"{base}/{algo}"])
        print(f"{algo:16s} exit {code} wall {time.perf_counter() - wall:6.2f} s cpu {time.process_time() - cpu:6.2f} s",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    timed(sys.argv[1], sys.argv[2:])
