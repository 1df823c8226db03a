"""``limit`` suite: the job against the same arithmetic as a plain PyTorch loop.

For each algorithm, four runs of the same job, interleaved ``--repeats``
times: ``python -m sfprompt_mpi.run`` in one process (the reference run,
``--threads 1``) and under ``mpiexec -n P+1`` (a server and P client ranks),
and the plain loop of :mod:`.plain` in one process and on P worker
processes (P = ``--procs``, by default the CPUs this process may use). Each
run's round time is the mean of its rounds after the first; each row holds
the median over the repetitions. The key ratio is plain / ours, the worst
row: 1 means no overhead at all; the goal is at least 0.9.

The plain loop draws the same batches from the same initial model, so it
also checks that the rounds compared do the same work: its final global
parameters are compared with the run's checkpoint (bitwise in one process;
under MPI with ``--server-batch`` above 1 the server may batch body passes,
which rounds differently).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..node import my_cpus
from .common import Report, check_finished, run_bounded
from .runs import WorkDir, add_common, extra_flags, launch

#: The suite's subjects by default: the paper's algorithm and the FedAvg baseline users compare it with.
DEFAULT_ALGOS = "fl-full,sfprompt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algos", default=DEFAULT_ALGOS, help="algorithms, comma-separated (--algo of the run)")
    p.add_argument("--clients", type=int, default=4, help="clients (--clients of every run)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per run; rounds after the first are averaged")
    p.add_argument("--procs", type=int, default=0, help="client processes of the parallel runs (0: the CPUs "
                                                         "this process may use)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; each row is their median")
    add_common(p)


def _plain(work: Path, name: str, flags: list[str], procs: int, timeout: float) -> dict[str, Any]:
    report = work / f"{name}.json"
    cmd = [sys.executable, "-m", "sfprompt_mpi.bench", "_plain", "--procs", str(procs), "--report", str(report),
           "--", *flags]
    print(f"# {name}: {' '.join(cmd)}", flush=True)
    check_finished(run_bounded(cmd, timeout), f"plain loop {name}")
    out = json.loads(report.read_text())
    out["params"] = report.with_suffix(".safetensors")
    return out


def _steady(times: list[float]) -> float:
    return float(np.mean(times[1:] if len(times) > 1 else times))


def _same(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _trial(work: Path, algo: str, flags: list[str], procs: int, args: argparse.Namespace, rep: int) -> list[dict]:
    """One repetition of the four runs of ``algo`` -> two rows (one process, ``procs`` processes)."""
    tag = f"{algo}_{rep}"
    rows = []
    for mode, ranks in (("1 process", None), (f"{procs} processes", procs + 1)):
        name = f"{tag}_{'mpi' if ranks else 'ref'}"
        ours = launch(work, name, flags, ranks, args.timeout)
        plain = _plain(work, f"{name}_plain", flags, procs if ranks else 1, args.timeout)
        acc = ours.series("test_acc")
        rows.append({"algo": algo, "mode": mode, "ours_round_s": ours.mean_round_s(),
                     "plain_round_s": _steady(plain["round_s"]),
                     "same_params": _same(plain["params"], ours.run_dir / "checkpoint" / "global.safetensors"),
                     "ours_acc": acc[max(acc)] if acc else float("nan"), "plain_acc": plain["test_acc"]})
    return rows


def run_limit(args: argparse.Namespace) -> Report:
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    from ..config import ALGOS
    bad = [a for a in algos if a not in ALGOS]
    if bad or not algos:
        raise UserError(f"--algos {args.algos!r}: use registered algorithms ({', '.join(ALGOS)})")
    procs = args.procs or len(my_cpus())
    if args.clients < 1 or args.rounds < 2 or args.repeats < 1 or procs < 1 or procs > args.clients:
        raise UserError("--clients must be >= 1, --rounds >= 2, --repeats >= 1 and 1 <= --procs <= --clients")
    base = ["--clients", str(args.clients), "--rounds", str(args.rounds), "--threads", "1", *extra_flags(args)]
    trials: list[dict] = []
    with WorkDir(args.work_dir) as work:
        for rep in range(args.repeats):  # interleaved: a noisy minute hurts every configuration alike
            for algo in algos:
                trials += _trial(work, algo, ["--algo", algo, *base], procs, args, rep)
    rows = []
    for algo in algos:
        for mode in ("1 process", f"{procs} processes"):
            mine = [t for t in trials if t["algo"] == algo and t["mode"] == mode]
            ours = statistics.median(t["ours_round_s"] for t in mine)
            plain = statistics.median(t["plain_round_s"] for t in mine)
            rows.append({"algo": algo, "mode": mode, "ours_round_s": ours, "plain_round_s": plain,
                         "plain/ours": plain / ours, "same_params": all(t["same_params"] for t in mine),
                         "ours_acc": mine[-1]["ours_acc"], "plain_acc": mine[-1]["plain_acc"]})
    notes = [f"{args.clients} clients, {args.rounds} rounds, 1 torch thread per process; round_s: mean of rounds "
             f"2..{args.rounds} of a run, median of {args.repeats} interleaved repetitions",
             f"ours: python -m sfprompt_mpi.run (one process; mpiexec -n {procs + 1}); plain: the same batches in a "
             f"plain PyTorch loop (one process; {procs} worker processes)",
             "same_params: the plain loop's final global parameters equal the run's checkpoint bitwise"]
    return Report("limit", rows, "min plain-loop / our round time", min(r["plain/ours"] for r in rows), ">= 0.9",
                  notes, extra={"trials": trials})
