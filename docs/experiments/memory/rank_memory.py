"""Peak private memory of every rank of an ``mpiexec`` run, and the node's lowest ``MemAvailable``.

    PYTHONPATH=$PWD SFPROMPT_RANK_GB=0 python docs/experiments/memory/rank_memory.py N [RUN_FLAGS...]

Starts ``mpiexec -n N python -m sfprompt_mpi.run --rounds 2 --threads 1 RUN_FLAGS`` (the offline
default unless RUN_FLAGS say otherwise), samples ``Private_Dirty`` of each rank from
``/proc/PID/smaps_rollup`` and ``MemAvailable`` every 0.3 s, and prints rank 0's setup line and the
per-rank peaks. ``SFPROMPT_KEEP_DYNAMO=1`` in the environment measures ranks that import
``torch._dynamo`` as usual; ``SFPROMPT_RANK_GB=0`` skips the run's own memory check.
"""

import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sfprompt_mpi.world import _mem_available_gb  # what the run's own memory check reads

ranks, flags = int(sys.argv[1]), sys.argv[2:]
venv = Path(sys.executable).parent
run_dir = tempfile.mkdtemp(prefix="rank-memory-")
cmd = [str(venv / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "sfprompt_mpi.run", "--rounds", "2",
       "--threads", "1", *flags, "--run-dir", run_dir]
t0 = time.time()
job = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)


def _ranks() -> list[str]:
    found = []
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            line = Path(proc, "cmdline").read_text()
        except OSError:
            continue
        if run_dir in line and "mpiexec" not in line:
            found.append(proc)
    return found


peak: dict[str, float] = {}
lowest = float("inf")
while job.poll() is None:
    for proc in _ranks():
        try:
            for line in Path(proc, "smaps_rollup").read_text().splitlines():
                if line.startswith("Private_Dirty:"):
                    peak[proc] = max(peak.get(proc, 0.0), int(line.split()[1]) / 2**20)
        except OSError:
            pass
    lowest = min(lowest, _mem_available_gb() or lowest)
    time.sleep(0.3)
print("\n".join(line for line in job.stdout.read().splitlines() if "setup took" in line or "error" in line))
values = sorted(peak.values())
print(f"{ranks} ranks, exit {job.returncode}, {time.time() - t0:.0f} s: peak Private_Dirty per rank min {values[0]:.3f}, "
      f"median {values[len(values) // 2]:.3f}, max {values[-1]:.3f} GB; {sum(values):.2f} GB together; "
      f"MemAvailable down to {lowest:.1f} GB")
