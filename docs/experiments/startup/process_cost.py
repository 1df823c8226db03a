"""CPU of a small run as a process starts and ends now, against the ways it did before.

    python docs/experiments/startup/process_cost.py [REPEATS] [RANKS]

Alternates four commands REPEATS times (default 6), each ``python -m sfprompt_mpi.run`` with 2
clients, 1 round and 64 training samples, in one process (``--reference``) when RANKS is 1 (the
default), else under ``mpiexec -n RANKS``:

- ``now``: the command as it is;
- ``usual exit``: the command ending with ``sys.exit`` (the interpreter's teardown) instead of
  ``cli.end_process``;
- ``collector on``: torch imported before the run starts, so its import runs with the cyclic
  garbage collector as usual and nothing is frozen (``lean.importing_for_good`` finds torch there);
- ``and teardown``: that, and the process ends with ``sys.exit`` (the interpreter's teardown)
  instead of ``cli.end_process``.

Prints each command's median and runs' CPU (user + sys of the command and every process it waited for).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--clients", "2", "--rounds", "1", "--max-train-samples", "64", "--max-test-samples", "32", "--threads", "1"]
ENDINGS = {"now": ["-m", "sfprompt_mpi.run"],
           "usual exit": ["-c", "import sys; from sfprompt_mpi.run import cli; sys.exit(cli())"],
           "collector on": ["-c", "import torch; from sfprompt_mpi.cli import end_process; from sfprompt_mpi.run import cli; "
                                  "end_process(cli())"],
           "and teardown": ["-c", "import sys, torch; from sfprompt_mpi.run import cli; sys.exit(cli())"]}


def alternate(variants: dict[str, list[str]], flags: list[str], repeats: int, ranks: int) -> None:
    """Run each variant (the arguments after ``python``) with ``flags`` and its own run directory,
    alternating, ``repeats`` times, in one process (``--reference``) or under ``mpiexec -n ranks``;
    print each one's median and runs' CPU."""
    launcher = [] if ranks == 1 else [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)]
    flags = [*flags, *(["--reference"] if ranks == 1 else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name, entry in variants.items():
                run_dir = Path(tmp) / "run"
                shutil.rmtree(run_dir, ignore_errors=True)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                done = subprocess.run([*launcher, sys.executable, *entry, *flags, "--run-dir", str(run_dir)],
                                      env=env, capture_output=True, text=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if done.returncode != 0:
                    sys.exit(f"{name}: exit code {done.returncode}\n{done.stderr[-3000:]}")
                cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    for name, values in cpu.items():
        print(f"{name:16s} median {statistics.median(values):.2f} s CPU; runs: {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    alternate(ENDINGS, FLAGS, int(sys.argv[1]) if len(sys.argv) > 1 else 6, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
