"""What ``analyze`` reports of the simulated clock (runs with ``--devices``), as the device papers do.

- accuracy against simulated time (``accuracy_vs_simtime.png``),
- time to a target accuracy (``--target-acc``): the first evaluated round
  whose accuracy reaches it, with the simulated and the measured time to its end,
- per client: mean simulated seconds per round computing, downloading,
  uploading, waiting for (and served by) the server, and idle waiting for the
  round's slowest client (the straggler time), with its device
  (``sim_clients.csv``, ``sim_clients.png``).

Every number here was written by the server during the run (the ``sim/*``
columns, per-client arrays in the order of ``selected``); nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PARTS = ("compute", "down", "up", "server", "idle")


def add_sim_time(rows: list[dict[str, Any]], server_series: dict[str, dict[int, Any]]) -> None:
    """Give each round row its ``sim_round_s``, the cumulative ``cum_sim_s`` and the clients' mean
    straggler wait ``sim_idle_s`` (in place)."""
    rounds, idle = server_series.get("sim/round_s", {}), server_series.get("sim/client_idle_s", {})
    total = 0.0
    for row in rows:
        if row["round"] in rounds:
            total += float(rounds[row["round"]])
            row["sim_round_s"] = float(rounds[row["round"]])
            row["cum_sim_s"] = total
        if row["round"] in idle:
            row["sim_idle_s"] = float(np.mean(idle[row["round"]]))


def time_to_target(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluated round reaching ``target`` accuracy: its round, simulated and wall seconds."""
    for row in rows:
        if row.get("test_acc", -1.0) >= target:
            return {"round": row["round"], "sim_s": row.get("cum_sim_s"), "wall_s": row.get("cum_wall_s")}
    return None


def client_breakdown(server_series: dict[str, dict[int, Any]], names: list[str] | None) -> list[dict[str, Any]]:
    """Per client (selected at least once): rounds, mean simulated seconds per part per round, device."""
    selected = server_series.get("selected", {})
    sums: dict[int, dict[str, float]] = {}
    for rnd, ids in selected.items():
        for part in PARTS:
            values = server_series.get(f"sim/client_{part}_s", {}).get(rnd)
            if values is None:
                continue
            for cid, v in zip(np.asarray(ids, dtype=int).tolist(), np.asarray(values, dtype=float).tolist()):
                acc = sums.setdefault(cid, {"rounds": 0.0, **{p: 0.0 for p in PARTS}})
                acc[part] += v
                acc["rounds"] += part == PARTS[0]
    out = []
    for cid in sorted(sums):
        acc = sums[cid]
        n = max(acc["rounds"], 1.0)
        device = names[cid] if names and cid < len(names) else ""
        out.append({"client": cid, "device": device, "rounds": int(acc["rounds"]),
                    **{f"{p}_s": acc[p] / n for p in PARTS}})
    return out


def format_breakdown(label: str, clients: list[dict[str, Any]]) -> str:
    """The per-client table of one run (seconds per round, simulated)."""
    head = f"{'client':>6}  {'device':<12} {'rounds':>6}" + "".join(f" {p + ' [s]':>12}" for p in PARTS)
    lines = [f"simulated time per client and round [{label}]", head]
    lines += [f"{c['client']:>6}  {c['device']:<12} {c['rounds']:>6}" + "".join(f" {c[p + '_s']:>12.4g}" for p in PARTS)
              for c in clients]
    return "\n".join(lines)


def write_breakdown_plot(label: str, clients: list[dict[str, Any]], path: Path) -> Path:
    """Stacked bars per client: simulated seconds per round in each part, idle (straggler wait) on top."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(6.0, 0.35 * len(clients) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(clients))
    bottom = np.zeros(len(clients))
    for j, part in enumerate(PARTS):
        h = np.array([c[f"{part}_s"] for c in clients])
        ax.bar(x, h, bottom=bottom, label="idle (straggler wait)" if part == "idle" else part,
               color="lightgray" if part == "idle" else f"C{j}")
        bottom += h
    ax.set_xticks(x, [f"{c['client']}\n{c['device']}" if c["device"] else str(c["client"]) for c in clients],
                  fontsize="small", rotation=90 if len(clients) > 12 else 0)
    ax.set(title=f"{label}: simulated time per round", xlabel="client", ylabel="seconds per round")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def device_names(run_path: Path) -> list[str] | None:
    """The device name of each client from the run's config.toml ``[devices]`` record, if any."""
    from .config import DEVICES, tomllib
    try:
        record = tomllib.loads((run_path / "config.toml").read_text()).get(DEVICES)
    except (OSError, ValueError):
        return None
    return [str(n) for n in record["name"]] if record else None
