"""What every benchmark suite shares: launching, bounded subprocesses, reports.

A suite returns a :class:`Report`: rows (one per size or configuration), the
key ratio with its goal, and notes. :func:`emit` prints the rows as a table
and the key ratio as the last line, and writes the same as JSON with
``--json``. Suites that need several ranks launch ``mpiexec`` themselves
(:func:`mpiexec_cmd`); every child process is bounded and its whole process
group is killed on timeout, so a hung rank fails the benchmark with a
message instead of stalling it.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..output import write_json

#: Environment variables that a process started by an MPI launcher has.
MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


@dataclass
class Report:
    """One suite's result: rows, the key ratio (``key`` names it) and notes."""

    suite: str
    rows: list[dict[str, Any]]
    key: str
    value: float
    goal: str = ""
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, argv: list[str]) -> dict[str, Any]:
        return {"suite": self.suite, "command": "python -m sfprompt_mpi.bench " + " ".join(argv),
                "machine": machine(), "rows": self.rows, "key": self.key, "value": _finite(self.value),
                "goal": self.goal, "notes": self.notes, **self.extra}

    def last_line(self) -> str:
        goal = f" (goal {self.goal})" if self.goal else ""
        return f"{self.suite}: {self.key} = {self.value:.3f}{goal}"


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def machine() -> dict[str, Any]:
    """Where the figures were taken."""
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def emit(report: Report, argv: list[str], json_path: str | None) -> None:
    """Print the table, the notes and, last, the key ratio; write JSON if asked."""
    print(format_table(report.rows))
    for note in report.notes:
        print(f"# {note}")
    if json_path:
        write_json(json_path, report.to_dict(argv), indent=1, default=_json_default)
    print(report.last_line(), flush=True)


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as an aligned plain-text table (columns in first-seen order)."""
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def parse_size(text: str) -> int:
    """``4K``, ``64M``, ``1G`` or plain bytes -> bytes (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            n = int(float(t[:-1]) * units[t[-1]])
        else:
            n = int(t)
    except ValueError:
        raise UserError(f"bad size {text!r}: use bytes or a number with K, M or G (e.g. 64K, 16M)") from None
    if n <= 0:
        raise UserError(f"bad size {text!r}: must be positive")
    return n


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad {what} {text!r}: a comma-separated list of integers, e.g. 50,500,5000") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"bad {what} {text!r}: every value must be >= 1")
    return values


# ---------------------------------------------------------------- launching


def under_mpi() -> bool:
    """Whether an MPI launcher started this process."""
    return any(v in os.environ for v in MPI_ENV)


def mpiexec_path() -> str:
    """``$SFPROMPT_MPIEXEC``, else the venv's ``mpiexec``, else the one on PATH."""
    env = os.environ.get("SFPROMPT_MPIEXEC", "").strip()
    if env:
        return env
    venv = Path(sys.executable).parent / "mpiexec"
    if venv.exists():
        return str(venv)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise UserError("this suite needs mpiexec, and none was found: install the [mpi] extra, put mpiexec "
                        "on PATH or set SFPROMPT_MPIEXEC")
    return found


def mpiexec_cmd(ranks: int, args: list[str]) -> list[str]:
    """``mpiexec -n ranks python args...`` (MPICH's and Open MPI's launcher take the same -n)."""
    return [mpiexec_path(), "-n", str(ranks), sys.executable, *args]


@dataclass
class Finished:
    cmd: list[str]
    returncode: int
    output: str
    wall_s: float


def run_bounded(cmd: list[str], timeout: float, *, echo: bool = False, env: dict[str, str] | None = None) -> Finished:
    """Run ``cmd`` with one torch thread per process (and ``env`` on top of ours), bounded by ``timeout`` seconds.

    Output is kept (and echoed as it comes when ``echo``). On timeout the whole
    process group (mpiexec, its proxy and every rank) is killed and a
    RuntimeError carries the output so far."""
    env = dict(os.environ, **(env or {}))
    env.setdefault("OMP_NUM_THREADS", "1")
    for var in MPI_ENV:  # a child launched from inside an MPI job must not think it is a rank of it
        env.pop(var, None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        _kill_group(proc)

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the child exits or the watchdog kills its group
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        proc.wait()
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        watchdog.cancel()
    if expired.is_set():
        raise RuntimeError(f"{' '.join(cmd)} still running after {timeout:.0f} s (killed); output so far:\n"
                           + "".join(lines[-60:]))
    return Finished(cmd, proc.returncode, "".join(lines), time.perf_counter() - t0)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_finished(f: Finished, what: str) -> None:
    """Raise, with the child's output, when it failed."""
    if f.returncode == 2:
        lines = [ln for ln in f.output.splitlines() if ln.startswith("error:")]
        raise UserError(f"{what}: {lines[-1].removeprefix('error: ') if lines else 'user error'}")
    if f.returncode != 0:
        tail = "\n".join(f.output.splitlines()[-40:])
        raise RuntimeError(f"{what} failed with exit code {f.returncode}:\n$ {' '.join(f.cmd)}\n{tail}")
