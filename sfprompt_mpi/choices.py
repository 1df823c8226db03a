"""What ``analyze`` reports of per-client choices: the ``clients/<id>/choice/<name>`` stats.

Algorithms that configure each client per round (LoRA ranks and depths, ...)
return ``choice/<name>`` stats from their client round; the client hosts
write them as ``clients/<id>/choice/<name>``. This prints, per client, the
choices of the first and the last round it took part in (``a -> b`` when they
differ), one line per client, and writes ``choices.csv`` (run, client,
round, name, value). Name-blind: any ``choice/`` key is shown.
"""

from __future__ import annotations

import re
from typing import Any

_KEY = re.compile(r"^clients/(\d+)/choice/(.+)$")


def choice_rows(label: str, ranks: list[Any]) -> list[dict[str, Any]]:
    """(run, client, round, name, value) of every choice in the rank files ``ranks`` (``.series``)."""
    rows = []
    for rank in ranks:
        for key, series in rank.series.items():
            m = _KEY.match(key)
            if m:
                rows += [{"run": label, "client": int(m.group(1)), "round": int(r), "name": m.group(2),
                          "value": float(v)} for r, v in series.items()]
    return sorted(rows, key=lambda r: (r["client"], r["round"], _natural(r["name"])))


def format_choices(label: str, rows: list[dict[str, Any]]) -> str:
    """One line per client: ``name=value`` of its first round (``first -> last`` where they differ)."""
    per: dict[int, dict[str, dict[int, float]]] = {}
    for r in rows:
        per.setdefault(r["client"], {}).setdefault(r["name"], {})[r["round"]] = r["value"]
    lines = [f"per-client choices of {label} (first -> last round):"]
    for cid in sorted(per):
        cells = []
        for name in sorted(per[cid], key=_natural):
            s = per[cid][name]
            first, last = s[min(s)], s[max(s)]
            cells.append(f"{name}={first:g}" + (f"->{last:g}" if last != first else ""))
        lines.append(f"  client {cid}: " + " ".join(cells))
    return "\n".join(lines)


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))
