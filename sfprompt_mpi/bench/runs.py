"""``round``, ``scale`` and ``wire`` suites: whole runs of the job, measured.

Each run is ``python -m sfprompt_mpi.run`` as a user starts it (under
``mpiexec -n W`` or in one process), through :mod:`.job` so that its transport
is timed per round, with its own run directory under ``--work-dir``. Figures
come from the run's HDF5 metrics (``round_s``, bytes per kind, test accuracy)
and from the job report (per-rank time split and memory).

Rounds after the first are averaged: the first pays one-time costs (lazy
allocations, first touches of the data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .common import Report, check_finished, mpiexec_cmd, parse_int_list, run_bounded


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", default="", help="where the runs' directories go (default: a temporary "
                                                   "directory, removed afterwards)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each run may take before it is killed")
    p.add_argument("run_flags", nargs=argparse.REMAINDER,
                   help="after --: extra flags for every run (python -m sfprompt_mpi.run flags)")


@dataclass
class RunResult:
    name: str
    run_dir: Path
    report: dict[str, Any]
    server: dict[str, tuple[np.ndarray, np.ndarray]]
    wall_s: float

    def series(self, key: str) -> dict[int, float]:
        steps, values = self.server.get(key, (np.array([]), np.array([])))
        return {int(s): float(v) for s, v in zip(steps, values)}

    def mean_round_s(self, skip_first: bool = True) -> float:
        rounds = self.series("round_s")
        keep = [v for r, v in sorted(rounds.items()) if not (skip_first and r == 1 and len(rounds) > 1)]
        return float(np.mean(keep)) if keep else float("nan")

    def bytes_total(self, prefix: str = "bytes_") -> float:
        return sum(float(v.sum()) for k, (_, v) in self.server.items() if k.startswith(prefix))


def extra_flags(args: argparse.Namespace) -> list[str]:
    flags = list(args.run_flags)
    return flags[1:] if flags[:1] == ["--"] else flags


def launch(work: Path, name: str, flags: list[str], ranks: int | None, timeout: float) -> RunResult:
    """One run of the job (``ranks`` None: one process), timed; its metrics read back."""
    from ..metrics.h5 import read_metrics
    run_dir, report = work / name, work / f"{name}.json"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = ["-m", "sfprompt_mpi.bench", "_job", "--report", str(report), "--",
            *flags, "--run-dir", str(run_dir)]
    cmd = mpiexec_cmd(ranks, args) if ranks else [sys.executable, *args]
    print(f"# {name}: {' '.join(cmd)}", flush=True)
    done = run_bounded(cmd, timeout)
    check_finished(done, f"run {name}")
    return RunResult(name, run_dir, json.loads(report.read_text()),
                     read_metrics(run_dir / "metrics" / "rank00000.h5"), done.wall_s)


class WorkDir:
    """``--work-dir`` or a temporary directory removed on exit."""

    def __init__(self, path: str) -> None:
        self.keep = bool(path)
        self.path = Path(path) if path else Path(tempfile.mkdtemp(prefix="sfprompt-bench-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def split_rows(res: RunResult) -> list[dict[str, Any]]:
    """Per rank: compute / send / payload / wait seconds, averaged over rounds after the first."""
    rows = []
    for rank, rep in enumerate(res.report["ranks"]):
        rounds = {int(k): v for k, v in rep["rounds"].items() if "wall_s" in v}
        keep = [v for k, v in rounds.items() if k > 1] or list(rounds.values())
        if not keep:
            continue
        mean = {p: float(np.mean([v[p] for v in keep])) for p in ("wall_s", "compute_s", "send_s", "payload_s",
                                                                    "wait_s")}
        comm = mean["send_s"] + mean["payload_s"]
        rows.append({"run": res.name, "rank": rank, "role": "server" if rank == 0 else "clients",
                     "round_s": mean["wall_s"], "compute_s": mean["compute_s"], "comm_s": comm,
                     "wait_s": mean["wait_s"], "compute_frac": mean["compute_s"] / max(mean["wall_s"], 1e-12),
                     "comm_frac": comm / max(mean["wall_s"], 1e-12),
                     "wait_frac": mean["wait_s"] / max(mean["wall_s"], 1e-12),
                     "peak_rss_mb": rep["peak_rss_mb"], "private_mb": rep["private_mb"]})
    return rows


# ------------------------------------------------------------------- round


def add_round_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=3, help="ranks of the distributed run (1 server + clients)")
    p.add_argument("--clients", type=int, default=2, help="clients (--clients of the run)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run; rounds after the first are averaged")
    add_common(p)


def run_round(args: argparse.Namespace) -> Report:
    if args.ranks < 2 or args.clients < args.ranks - 1 or args.rounds < 1:
        raise UserError("--ranks must be >= 2, --clients >= ranks - 1 and --rounds >= 1")
    flags = ["--clients", str(args.clients), "--rounds", str(args.rounds), "--threads", "1", *extra_flags(args)]
    with WorkDir(args.work_dir) as work:
        ref = launch(work, "reference", flags, None, args.timeout)
        dist = launch(work, "mpi", flags, args.ranks, args.timeout)
        rows = [{"run": "reference", "rank": "-", "role": "one process", "round_s": ref.mean_round_s(),
                 "peak_rss_mb": ref.report["ranks"][0]["peak_rss_mb"],
                 "private_mb": ref.report["ranks"][0]["private_mb"]}]
        rows += split_rows(dist)
        ratio = dist.mean_round_s() / ref.mean_round_s()
        same = _same_params(ref.run_dir, dist.run_dir)
    notes = [f"round_s: server's round time, mean of rounds 2..{args.rounds}" if args.rounds > 1 else
             "round_s: the server's round time", "comm_s = time in send + payload receive; wait_s = time "
             "waiting for a message's header; compute_s = the rest of the round",
             f"final global parameters of both runs bitwise equal: {same}"]
    return Report("round", rows, f"distributed ({args.ranks} ranks) / single-process round time", ratio,
                  "close to 1 on the same hardware", notes, extra={"same_params": same})


def _same_params(a: Path, b: Path) -> bool | None:
    try:
        from safetensors.numpy import load_file
        x, y = load_file(str(a / "checkpoint" / "global.safetensors")), load_file(str(b / "checkpoint" /
                                                                                     "global.safetensors"))
    except (OSError, ImportError, FileNotFoundError):
        return None
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------- scale


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="50,500,5000", help="virtual client counts, comma-separated")
    p.add_argument("--samples-per-client", type=int, default=4, help="training samples per client (synthetic data)")
    p.add_argument("--ranks", type=int, default=3, help="ranks of each run (1 server + client hosts)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per run; rounds after the first are averaged")
    add_common(p)


def run_scale(args: argparse.Namespace) -> Report:
    counts = parse_int_list(args.clients, "--clients")
    if args.samples_per_client < 2 or args.ranks < 2 or args.rounds < 1:
        raise UserError("--samples-per-client must be >= 2, --ranks >= 2 and --rounds >= 1")
    if min(counts) < args.ranks - 1:
        raise UserError(f"every --clients value must be >= the {args.ranks - 1} client ranks")
    spc = args.samples_per_client
    rows = []
    with WorkDir(args.work_dir) as work:
        for n in counts:
            flags = ["--dataset", "synthetic", "--synthetic-samples", str(n * spc), "--max-test-samples", "64",
                     "--clients", str(n), "--rounds", str(args.rounds), "--batch-size", str(spc), "--threads", "1",
                     *extra_flags(args)]
            res = launch(work, f"clients{n}", flags, args.ranks, args.timeout)
            ranks = res.report["ranks"]
            round_s = res.mean_round_s()
            rows.append({"clients": n, "samples": n * spc, "round_s": round_s,
                         "us_per_sample": round_s / (n * spc) * 1e6,
                         "server_peak_rss_mb": ranks[0]["peak_rss_mb"], "server_private_mb": ranks[0]["private_mb"],
                         "client_peak_rss_mb": max(r["peak_rss_mb"] for r in ranks[1:]),
                         "client_private_mb": max(r["private_mb"] or 0 for r in ranks[1:]),
                         "MB_per_round": res.bytes_total() / 1e6 / max(len(res.series("round_s")), 1),
                         "run_wall_s": res.wall_s})
    first, last = rows[0], rows[-1]
    ratio = last["us_per_sample"] / first["us_per_sample"]
    mem = last["server_private_mb"] / first["server_private_mb"] if first["server_private_mb"] else float("nan")
    notes = [f"{args.ranks} ranks, synthetic data, {spc} samples per client, batch {spc}; round_s is the "
             "server's round time (mean of rounds after the first)",
             f"server private memory, largest / smallest client count: {mem:.2f} (flat is 1)",
             "peak_rss counts the shared torch libraries too; private_mb is the memory this rank alone holds "
             "at the end of the run"]
    return Report("scale", rows, f"time per sample, {last['clients']} / {first['clients']} clients", ratio,
                  "about 1 (linear in samples)", notes, extra={"server_mem_ratio": mem})


# -------------------------------------------------------------------- wire


def add_wire_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="wire dtypes; the first is the baseline")
    add_common(p)


def run_wire(args: argparse.Namespace) -> Report:
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad or not dtypes:
        raise UserError(f"--dtypes {args.dtypes!r}: use float32, bfloat16 and float16")
    rows = []
    with WorkDir(args.work_dir) as work:
        for dt in dtypes:
            res = launch(work, f"wire_{dt}", ["--wire-dtype", dt, *extra_flags(args)], None, args.timeout)
            acc = res.series("test_acc")
            acts = sum(res.bytes_total(f"bytes_{d}/{k}") for d in ("sent", "recv")
                       for k in ("acts", "body_out", "grad_out", "grad_acts"))
            rows.append({"wire_dtype": dt, "MB_total": res.bytes_total() / 1e6, "MB_activations": acts / 1e6,
                         "final_test_acc": acc[max(acc)] if acc else float("nan"),
                         "round_s": res.mean_round_s()})
    base = rows[0]
    for r in rows:
        r["bytes_ratio"] = r["MB_total"] / base["MB_total"]
        r["acc_change"] = r["final_test_acc"] - base["final_test_acc"]
    cheapest = min(rows, key=lambda r: r["bytes_ratio"])
    notes = [f"bytes counted at the server (sent + received, headers included) over the whole run; "
             f"run flags: {' '.join(extra_flags(args)) or '(offline default)'}",
             f"accuracy change of {cheapest['wire_dtype']}: {cheapest['acc_change']:+.4f}"]
    return Report("wire", rows, f"bytes {cheapest['wire_dtype']} / {base['wire_dtype']}", cheapest["bytes_ratio"],
                  "", notes, extra={"acc_change": cheapest["acc_change"]})
