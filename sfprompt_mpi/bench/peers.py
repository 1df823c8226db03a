"""``peers`` suite: the same FedAvg job under Flower, pfl-research and this project.

FedAvg full fine-tuning (``--algo fl-full``) of the run's model on its data,
every client every round, at each ``--clients`` count: this project in one
process (``python -m sfprompt_mpi.run --reference``) and on every core
(``mpiexec -n CPUs+1``), Flower's simulation engine (Ray, one CPU per client)
and pfl-research in one process (``pfl``) and with a worker per CPU under
torchrun (``pfl-torchrun``, pfl's documented way to use several processes),
their jobs in :mod:`.peer_jobs`. Runs are
interleaved ``--repeats`` times; a run's round time is the mean of its rounds
after the first (Ray's start-up lands in Flower's first), and each cell is
the median over the repetitions. The key ratio is the fastest peer's round
time over ours, the worst of one process and every core at any count; the
goal is 1.5 (ahead by half again). Our one process is held against the
peers in one process (pfl), our every core against every peer.

Flower and pfl are the ``peers`` extra (``pip install -e '.[peers]'``),
never core dependencies: they pin ``packaging<26`` and Ray is large, so they
may live in a separate venv, named by ``--python`` or ``$SFPROMPT_PEERS_PYTHON``
(it must also import this package, e.g. with PYTHONPATH). The suite stops
with one line, exit code 2, where that Python lacks them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..node import my_cpus
from .common import Report, check_finished, parse_int_list, run_bounded
from .runs import WorkDir, add_common, extra_flags, launch

PEERS = ("flower", "pfl", "pfl-torchrun")
ONE_PROCESS = ("pfl",)  # the peers that run in one process; Flower's Ray and torchrun use every core
_EXTRA = "import flwr, pfl, ray, flwr.simulation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="4,50", help="client counts, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="rounds per run; rounds after the first are averaged")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; each cell is their median")
    p.add_argument("--peers", default=",".join(PEERS), help="peers to run, comma-separated: " + ", ".join(PEERS))
    p.add_argument("--python", default=os.environ.get("SFPROMPT_PEERS_PYTHON", sys.executable),
                   help="the Python with the peers extra (default: $SFPROMPT_PEERS_PYTHON, else this one)")
    add_common(p)


def check_extra(python: str) -> None:
    """One line, exit 2, when ``python`` cannot import Flower (with Ray) and pfl."""
    try:
        done = subprocess.run([python, "-c", _EXTRA], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, **_with_package()))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"the peers suite cannot start {python}: {exc}") from None
    if done.returncode != 0:
        missing = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        raise UserError(f"the peers suite needs the peers extra (flwr[simulation], pfl) in {python} ({missing}): "
                        "pip install -e '.[peers]', or install it in a separate venv and pass --python or set "
                        "SFPROMPT_PEERS_PYTHON")


def _with_package() -> dict[str, str]:
    """PYTHONPATH with this package first, so that another venv's Python imports it too."""
    here = str(Path(__file__).resolve().parents[2])
    return {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH", "")]))}


def peer_command(python: str, peer: str, report: Path, flags: list[str], workers: int) -> list[str]:
    """The command line of one peer's run; ``pfl-torchrun`` starts ``workers`` pfl workers on this node."""
    job = ["-m", "sfprompt_mpi.bench", "_peer", peer.removesuffix("-torchrun"), "--report", str(report), "--", *flags]
    if peer != "pfl-torchrun":
        return [python, *job]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={workers}", *job]


def _peer(work: Path, python: str, peer: str, name: str, flags: list[str], timeout: float) -> dict[str, Any]:
    report = work / f"{name}.json"
    cmd = peer_command(python, peer, report, flags, len(my_cpus()))
    print(f"# {name}: {' '.join(cmd)}", flush=True)
    check_finished(run_bounded(cmd, timeout, env=_with_package()), f"{peer} run {name}")
    out = json.loads(report.read_text())
    times = out["round_s"]
    return {"round_s": float(np.mean(times[1:] if len(times) > 1 else times)), "acc": out["test_acc"]}


def _ours(work: Path, name: str, flags: list[str], ranks: int | None, timeout: float) -> dict[str, Any]:
    res = launch(work, name, flags, ranks, timeout)
    acc = res.series("test_acc")
    return {"round_s": res.mean_round_s(), "acc": acc[max(acc)] if acc else float("nan")}


def run_peers(args: argparse.Namespace) -> Report:
    counts = parse_int_list(args.clients, "--clients")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if not peers or any(p not in PEERS for p in peers):
        raise UserError(f"--peers {args.peers!r}: choose among {', '.join(PEERS)}")
    if args.rounds < 2 or args.repeats < 1:
        raise UserError("--rounds must be >= 2 and --repeats >= 1")
    check_extra(args.python)
    cores = len(my_cpus()) + 1
    trials: list[dict[str, Any]] = []
    with WorkDir(args.work_dir) as work:
        for rep in range(args.repeats):  # interleaved: a noisy minute hurts every contender alike
            for n in counts:
                flags = ["--algo", "fl-full", "--clients", str(n), "--rounds", str(args.rounds), "--threads", "1",
                         *extra_flags(args)]
                tag = f"c{n}_{rep}"
                got = {"ours, 1 process": _ours(work, f"{tag}_ours1", flags, None, args.timeout),
                       f"ours, {cores} ranks": _ours(work, f"{tag}_ours{cores}", flags, cores, args.timeout)}
                for peer in peers:
                    got[_shown(peer)] = {**_peer(work, args.python, peer, f"{tag}_{peer}", flags, args.timeout),
                                         "one_process": peer in ONE_PROCESS}
                trials += [{"clients": n, "who": who, **v} for who, v in got.items()]
    rows = _rows(trials, counts)
    notes = [f"FedAvg full fine-tuning, {args.rounds} rounds; round_s: mean of rounds 2..{args.rounds} of a run, "
             f"median of {args.repeats} interleaved repetitions; acc: final test accuracy",
             "peer/ours: the fastest peer's round time over ours (above 1: we are faster); "
             "ours in 1 process against the peers in 1 process, ours on every core against every peer"]
    return Report("peers", rows, "min fastest-peer / our round time", min(r["peer/ours"] for r in rows if "peer/ours" in r),
                  ">= 1.5", notes, extra={"trials": trials})


def _rivals(who: str, one_process: dict[str, bool]) -> list[str]:
    """The peers held against our ``who``: in one process only those in one process, on every core all."""
    return [p for p, alone in one_process.items() if alone or who != "ours, 1 process"]


def _shown(peer: str) -> str:
    """A peer's name in the report: ``pfl-torchrun`` says how many workers it had."""
    return f"pfl, {len(my_cpus())} workers (torchrun)" if peer == "pfl-torchrun" else peer


def _rows(trials: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in counts:
        mine = [t for t in trials if t["clients"] == n]
        median = {who: statistics.median(t["round_s"] for t in mine if t["who"] == who)
                  for who in dict.fromkeys(t["who"] for t in mine)}
        one_process = {t["who"]: t["one_process"] for t in mine if not t["who"].startswith("ours")}
        for who, v in median.items():
            row = {"clients": n, "who": who, "round_s": v, "acc": [t for t in mine if t["who"] == who][-1]["acc"]}
            rivals = _rivals(who, one_process) if who.startswith("ours") else []
            if rivals:
                row["peer/ours"] = min(median[p] for p in rivals) / v
            rows.append(row)
    return rows
