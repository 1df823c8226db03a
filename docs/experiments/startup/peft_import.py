"""CPU of a small ``fedlora`` run as it is, peft imported with the rank's own imports (collector paused,
then frozen: ``lean.importing_for_good`` in ``start.run_job``), against peft imported after them with the
collector running and nothing frozen, as before that (then peft came when the model was built).

    python docs/experiments/startup/peft_import.py [REPEATS] [RANKS]

Alternates the two REPEATS times (default 6), each ``python -m sfprompt_mpi.run --algo fedlora`` with
2 clients, 1 round and 64 training samples, in one process (``--reference``) when RANKS is 1 (the
default), else under ``mpiexec -n RANKS``. Prints each one's median and runs' CPU (user + sys of the
command and every process it waited for).
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

FLAGS = ["--algo", "fedlora", "--clients", "2", "--rounds", "1", "--max-train-samples", "64",
         "--max-test-samples", "32", "--threads", "1"]
AFTER_IMPORTS = ("from sfprompt_mpi.lean import defer_imports, importing_for_good\n"
                 "with importing_for_good():\n"
                 "    import torch; defer_imports(); from sfprompt_mpi import runtime\n"
                 "import peft\n"
                 "from sfprompt_mpi.cli import end_process; from sfprompt_mpi.run import cli; end_process(cli())")
VARIANTS = {"now": ["-m", "sfprompt_mpi.run"], "peft after": ["-c", AFTER_IMPORTS]}


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    ranks = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    launcher = [] if ranks == 1 else [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)]
    flags = [*FLAGS, *(["--reference"] if ranks == 1 else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name, entry in VARIANTS.items():
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
    main()
