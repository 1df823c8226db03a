"""CPU seconds per round of the run under ``mpiexec -n P+1`` and of the plain loop on P workers.

Each side runs with R and with 2R rounds; the difference of the CPU its processes used, divided
by R, is the CPU of one round without start-up. The CPU of every process under the command is
read from ``/proc`` every 50 ms while it runs (``RUSAGE_CHILDREN`` would miss workers that are
not waited for). The sides alternate, ``--pairs`` times. Also prints each side's round time (the
run's ``round_s``, the plain loop's report) and how busy the cores were: CPU per round /
(round time x cores).

    python docs/experiments/limit/cpu_per_round.py [ALGO] [R] [P] [PAIRS]   (defaults: sfprompt 4 2 2)
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

algo = sys.argv[1] if len(sys.argv) > 1 else "sfprompt"
R = int(sys.argv[2]) if len(sys.argv) > 2 else 4
P = int(sys.argv[3]) if len(sys.argv) > 3 else 2
PAIRS = int(sys.argv[4]) if len(sys.argv) > 4 else 2
py = sys.executable
flags = ["--algo", algo, "--clients", "4", "--threads", "1"]
env = dict(os.environ, OMP_NUM_THREADS="1")
TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float | None:
    """CPU seconds a process has used so far, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def cpu_of(cmd: list[str]) -> float:
    """CPU seconds of ``cmd`` and every process under it (sampled every 50 ms, reading only those)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        todo, tree = [proc.pid], set()
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo += _children(pid) - tree
        for pid in tree:
            cpu = _cpu(pid)
            if cpu is not None:
                seen[pid] = max(seen.get(pid, 0.0), cpu)
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
    return sum(seen.values())


def ours(rounds: int, work: Path) -> tuple[float, float]:
    run_dir = work / f"ours{rounds}"
    mpiexec = str(Path(py).with_name("mpiexec"))
    cpu = cpu_of([mpiexec, "-n", str(P + 1), py, "-m", "sfprompt_mpi.run", *flags, "--rounds", str(rounds),
                  "--run-dir", str(run_dir)])
    with h5py.File(run_dir / "metrics" / "rank00000.h5") as f:
        return cpu, float(np.mean(f["round_s"]["value"][1:]))


def plain(rounds: int, work: Path) -> tuple[float, float]:
    report = work / f"plain{rounds}.json"
    cpu = cpu_of([py, "-m", "sfprompt_mpi.bench", "_plain", "--procs", str(P), "--report", str(report), "--",
                  *flags, "--rounds", str(rounds)])
    return cpu, float(np.mean(json.loads(report.read_text())["round_s"][1:]))


for pair in range(PAIRS):
    for name, side in (("ours", ours), ("plain", plain)):
        with tempfile.TemporaryDirectory() as tmp:
            (c1, _), (c2, round_s) = side(R, Path(tmp)), side(2 * R, Path(tmp))
        per_round = (c2 - c1) / R
        print(f"{name:5s} {algo}: {per_round:.2f} CPU s per round, round {round_s:.3f} s, cores busy "
              f"{per_round / (round_s * len(os.sched_getaffinity(0))):.0%}", flush=True)
