"""The devices the clients stand for: compute speed, memory, links (``--devices SPEC``).

Ranks of an HPC job are alike; the clients of the papers are not. A device
profile says what each client's device (and the server) can do, and the
simulated clock (:mod:`.simclock`) turns what a round actually counted into
the time it would have taken on them. ``SPEC`` is a preset name
(:data:`PRESETS`) or a ``.toml`` / ``.csv`` file:

TOML: a ``[server]`` table and ``[[clients]]`` entries; each entry stands for
``count`` clients (default 1) or a ``share`` of them, and a value may be a
``[low, high]`` range drawn uniformly per client (seeded by ``--seed``)::

    [server]
    tflops = 35.6              # TFLOP/s; optional: mbps (link cap), latency_ms
    [[clients]]
    name = "tx2"
    share = 0.375              # or count = 30; entries by share are shuffled over the clients (seeded)
    tflops = 1.3
    memory_gb = 8
    down_mbps = [20, 100]
    up_mbps = [5, 50]
    latency_ms = 10

CSV: a header ``name,tflops,memory_gb,down_mbps,up_mbps,latency_ms``, one row
per client in client order, and one row named ``server`` (its memory and
down/up columns may be empty; up_mbps, when given, caps every transfer).

The resolved profiles (one per client) are kept in the run's config.toml and
every rank's HDF5 file as the ``[devices]`` record, so ``--resume`` keeps them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

#: What a client entry gives (name is optional); latency_ms defaults to 0.
CLIENT_FIELDS = ("tflops", "memory_gb", "down_mbps", "up_mbps", "latency_ms")
NONE = "none"


@dataclass(frozen=True)
class Device:
    """One client's device: training compute, memory, links, per-message latency."""

    name: str
    tflops: float        # sustained training compute, 1e12 FLOP/s
    memory_gb: float     # what the client's part of the model, optimiser and activations may use
    down_mbps: float
    up_mbps: float
    latency_ms: float = 0.0


@dataclass(frozen=True)
class Server:
    """The server: compute for the body passes and aggregation; ``mbps`` (0: none) caps every transfer."""

    tflops: float
    mbps: float = 0.0
    latency_ms: float = 0.0


@dataclass(frozen=True)
class Devices:
    """The resolved profiles of a run: one :class:`Device` per client, in client order."""

    spec: str
    server: Server
    clients: tuple[Device, ...]

    def record(self) -> dict[str, Any]:
        """The ``[devices]`` record of config.toml (columns, so 1000 clients stay 6 lines)."""
        out: dict[str, Any] = {"spec": self.spec, **{f"server_{k}": v for k, v in asdict(self.server).items()}}
        out["name"] = [d.name for d in self.clients]
        for key in CLIENT_FIELDS:
            out[key] = [float(getattr(d, key)) for d in self.clients]
        return out

    def describe(self) -> list[str]:
        """Lines for ``--dry-run``: the device types and how many clients each."""
        kinds: dict[str, list[Device]] = {}
        for d in self.clients:
            kinds.setdefault(d.name, []).append(d)
        lines = [f"  devices ({self.spec}): server {self.server.tflops:g} TFLOP/s"
                 + (f", link {self.server.mbps:g} Mbit/s" if self.server.mbps else "")]
        for name, ds in kinds.items():
            up = [d.up_mbps for d in ds]
            lines.append(f"    {len(ds)} x {name}: {ds[0].tflops:g} TFLOP/s, {ds[0].memory_gb:g} GB, "
                         f"up {min(up):.3g}-{max(up):.3g} Mbit/s")
        return lines


# -- presets --------------------------------------------------------------------------------------
# table1: SFPrompt's appendix Table 1 takes link speeds from PromptFL (54 Mbit/s down, 12 up) and
# training latency from the VPT paper (not given as a speed). The client compute here is a
# Jetson TX2's vendor peak (1.3 TFLOP/s FP16) and the server an RTX 3090's FP32 peak (35.6 TFLOP/s),
# the GPU the paper's experiments ran on.
# jetson: the testbed of FedSpine (arXiv 2501.02438): 30 TX2, 40 Xavier NX, 10 AGX Xavier, probably
# also MergeSFL's and LEGEND's 80 devices (their papers do not list it). Memory is the vendor's
# (8 / 8 / 32 GB); compute follows the 1 : 2 : 4 speed ratio the LEGEND and FedSpine digests
# reconstruct, anchored on the TX2's vendor 1.3 TFLOP/s; uplinks 5-50 Mbit/s as reconstructed there;
# downlinks 4x (20-200 Mbit/s) and 10 ms latency are this project's choice (the papers do not say).
PRESETS: dict[str, dict[str, Any]] = {
    "table1": {"server": {"tflops": 35.6},
               "clients": [{"name": "table1-client", "share": 1.0, "tflops": 1.3, "memory_gb": 8,
                            "down_mbps": 54, "up_mbps": 12, "latency_ms": 0}]},
    "jetson": {"server": {"tflops": 35.6, "mbps": 1000},
               "clients": [
                   {"name": "tx2", "share": 30 / 80, "tflops": 1.3, "memory_gb": 8,
                    "down_mbps": [20, 200], "up_mbps": [5, 50], "latency_ms": 10},
                   {"name": "xavier-nx", "share": 40 / 80, "tflops": 2.6, "memory_gb": 8,
                    "down_mbps": [20, 200], "up_mbps": [5, 50], "latency_ms": 10},
                   {"name": "agx-xavier", "share": 10 / 80, "tflops": 5.2, "memory_gb": 32,
                    "down_mbps": [20, 200], "up_mbps": [5, 50], "latency_ms": 10}]},
}


def resolve(spec: str, num_clients: int, seed: int) -> Devices | None:
    """The profiles of ``num_clients`` clients for ``--devices spec`` (None for 'none')."""
    if spec == NONE:
        return None
    if spec in PRESETS:
        return _from_entries(spec, PRESETS[spec], num_clients, seed)
    path = Path(spec)
    if path.suffix not in (".toml", ".csv"):
        raise UserError(f"--devices {spec}: neither a preset ({', '.join([NONE, *PRESETS])}) nor a .toml/.csv file")
    if not path.is_file():
        raise UserError(f"--devices {spec}: no such file")
    if path.suffix == ".csv":
        return _from_csv(spec, path, num_clients)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--devices {spec}: not valid TOML: {exc}") from None
    return _from_entries(spec, raw, num_clients, seed)


def from_record(record: dict[str, Any], num_clients: int) -> Devices:
    """Rebuild the profiles saved as a run's ``[devices]`` record (see :meth:`Devices.record`)."""
    where = f"the [devices] record of spec {record.get('spec', '?')!r}"
    try:
        server = _server({k[len("server_"):]: v for k, v in record.items() if k.startswith("server_")}, where)
        columns = {k: record[k] for k in ("name", *CLIENT_FIELDS)}
    except KeyError as exc:
        raise UserError(f"{where} lacks {exc.args[0]}") from None
    n = len(columns["name"])
    if any(len(v) != n for v in columns.values()):
        raise UserError(f"{where}: its columns differ in length")
    clients = [_device({k: v[i] for k, v in columns.items()}, f"{where}, client {i}") for i in range(n)]
    return _enough(str(record["spec"]), server, clients, num_clients)


def _from_entries(spec: str, raw: dict[str, Any], num_clients: int, seed: int) -> Devices:
    where = f"--devices {spec}"
    unknown = set(raw) - {"server", "clients"}
    if unknown:
        raise UserError(f"{where}: unknown table(s) {', '.join(sorted(unknown))} (known: server, clients)")
    if not isinstance(raw.get("server"), dict):
        raise UserError(f"{where}: no [server] table (it needs tflops)")
    server = _server(raw["server"], f"{where} [server]")
    entries = raw.get("clients")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{where}: no [[clients]] entries")
    rng = np.random.default_rng([seed, 0xDE71CE])
    by_count, by_share = [], []
    for i, e in enumerate(entries):
        if "count" in e and "share" in e:
            raise UserError(f"{where}: clients entry {i + 1} gives both count and share")
        (by_share if "share" in e else by_count).append((i, e))
    kinds = [e for _, e in by_count for _ in range(_count(e, f"{where}: clients entry"))]
    rest = num_clients - len(kinds)
    if by_share and rest > 0:
        shares = [_positive(e["share"], f"{where}: clients entry {i + 1} share") for i, e in by_share]
        counts = _largest_remainder(shares, rest)
        drawn = [e for (_, e), c in zip(by_share, counts) for _ in range(c)]
        kinds += [drawn[j] for j in rng.permutation(len(drawn))]
    clients = [_device(_draw(e, rng, f"{where}: clients entry {entries.index(e) + 1}"),
                       f"{where}: clients entry {entries.index(e) + 1}") for e in kinds]
    return _enough(spec, server, clients, num_clients)


def _from_csv(spec: str, path: Path, num_clients: int) -> Devices:
    where = f"--devices {spec}"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [k for k in ("name", *CLIENT_FIELDS[:-1]) if rows and k not in rows[0]]
    if not rows or missing:
        raise UserError(f"{where}: needs a header with name,{','.join(CLIENT_FIELDS)} and one row per client"
                        + (f" (missing: {', '.join(missing)})" if missing else ""))
    servers = [r for r in rows if r["name"] == "server"]
    if len(servers) != 1:
        raise UserError(f"{where}: needs exactly one row named server, found {len(servers)}")
    s = servers[0]
    server = _server({"tflops": s["tflops"], "mbps": s.get("up_mbps") or 0, "latency_ms": s.get("latency_ms") or 0},
                     f"{where}, row server")
    clients = [_device({k: v for k, v in r.items() if v not in (None, "")}, f"{where}, row {i + 2}")
               for i, r in enumerate(rows) if r["name"] != "server"]
    return _enough(spec, server, clients, num_clients)


def _enough(spec: str, server: Server, clients: list[Device], num_clients: int) -> Devices:
    if len(clients) < num_clients:
        raise UserError(f"--devices {spec}: {len(clients)} client profile(s) for {num_clients} clients")
    return Devices(spec, server, tuple(clients[:num_clients]))


def _server(raw: dict[str, Any], where: str) -> Server:
    if "tflops" not in raw:
        raise UserError(f"{where}: the server needs tflops")
    return Server(tflops=_positive(raw["tflops"], f"{where} tflops"),
                  mbps=_number(raw.get("mbps", 0), f"{where} mbps", allow_zero=True),
                  latency_ms=_number(raw.get("latency_ms", 0), f"{where} latency_ms", allow_zero=True))


def _device(raw: dict[str, Any], where: str) -> Device:
    missing = [k for k in CLIENT_FIELDS[:-1] if k not in raw]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    values = {k: _positive(raw[k], f"{where} {k}") for k in CLIENT_FIELDS[:-1]}
    values["latency_ms"] = _number(raw.get("latency_ms", 0), f"{where} latency_ms", allow_zero=True)
    return Device(name=str(raw.get("name", "client")), **values)


def _draw(entry: dict[str, Any], rng: np.random.Generator, where: str) -> dict[str, Any]:
    """One client's values from an entry: a [low, high] range is drawn uniformly."""
    out = {}
    for k, v in entry.items():
        if isinstance(v, list):
            if len(v) != 2:
                raise UserError(f"{where} {k}: a range is [low, high], got {v!r}")
            lo, hi = (_number(x, f"{where} {k}", allow_zero=True) for x in v)
            if hi < lo:
                raise UserError(f"{where} {k}: range [{lo:g}, {hi:g}] has high < low")
            v = float(lo + (hi - lo) * rng.random())
        out[k] = v
    return out


def _count(entry: dict[str, Any], where: str) -> int:
    c = entry.get("count", 1)
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise UserError(f"{where} count must be an integer >= 1, got {c!r}")
    return c


def _number(value: Any, where: str, *, allow_zero: bool) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise UserError(f"{where} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return x


def _positive(value: Any, where: str) -> float:
    return _number(value, where, allow_zero=False)


def _largest_remainder(shares: list[float], n: int) -> list[int]:
    """``n`` split in proportion to ``shares`` (largest remainder; ties to the earlier entry)."""
    total = sum(shares)
    exact = [s * n / total for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[:n - sum(counts)]:
        counts[i] += 1
    return counts
