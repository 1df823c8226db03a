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

import sys

from process_cost import FLAGS as SMALL_RUN, alternate  # beside this script

FLAGS = ["--algo", "fedlora", *SMALL_RUN]
AFTER_IMPORTS = ("from sfprompt_mpi.lean import defer_imports, importing_for_good\n"
                 "with importing_for_good():\n"
                 "    import torch; defer_imports(); from sfprompt_mpi import runtime\n"
                 "import peft\n"
                 "from sfprompt_mpi.cli import end_process; from sfprompt_mpi.run import cli; end_process(cli())")
VARIANTS = {"now": ["-m", "sfprompt_mpi.run"], "peft after": ["-c", AFTER_IMPORTS]}


if __name__ == "__main__":
    alternate(VARIANTS, FLAGS, int(sys.argv[1]) if len(sys.argv) > 1 else 6, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
