"""Per-rank HDF5 metrics: one file per rank, ``run.h5`` links them together.

Layout of ``RUN_DIR/metrics/rankNNNNN.h5`` (``SCHEMA_VERSION`` 2)::

    /                      attrs: schema_version, rank, role, json_attrs and
                           whatever the caller passed (config, versions, host,
                           device, ...); dicts/lists are stored as JSON
                           strings and their names listed in ``json_attrs``
    /<key>/step            int64 (n,), resizable, fill value -1
    /<key>/value           float64 (n,) for scalars, (n, k) for fixed-length
                           arrays, vlen float64 (n,) when an array's length
                           changes between rounds; attr ``kind`` is
                           "scalar", "fixed" or "vlen"
    /clients/<name>/step   int64 (n,)   a client table: the scalar stat
    /clients/<name>/client int64 (n,)   <name> of every client of the rank,
    /clients/<name>/value  float64 (n,) one row per client and round
    /events                compound (step int64, kind str, text str), (n,)

A key is a ``/``-separated path ("test_acc", "bytes_sent/acts",
"clients/3/local_loss"); ``step`` is the round. Each call to
:meth:`MetricsWriter.log` or :meth:`MetricsWriter.event` appends and flushes,
so a crash loses at most the round in progress. A scalar logged as
``clients/<id>/<name>`` goes into the client table of ``<name>``, held until
the next flush (the host's round row) and written with its round's other
clients' rows in one append; :func:`read_metrics` gives it back as the series
``clients/<id>/<name>``. A host of C clients thus keeps a few tables instead
of some 8 x C series, each a group of two datasets (schema 1, still read:
12-15 ms per client to create in its first round, 1-5 ms per client and round
to append, about 90 KB of metadata cache per client).

``RUN_DIR/run.h5`` holds relative external links ``rankNNNNN ->
metrics/rankNNNNN.h5:/`` and rank 0's run-wide attrs plus ``world_size``.

Every file is opened with HDF5 file locking off: a rank only ever opens its
own file, readers (``analyze`` on a live run) must not be blocked by the
writer, and HDF5 refuses to open one file twice in a process with different
locking flags.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import UserError

SCHEMA_VERSION = 2
_EVENT_DTYPE = np.dtype([("step", "<i8"), ("kind", h5py.string_dtype()),
                         ("text", h5py.string_dtype())])
_VLEN_F64 = h5py.vlen_dtype(np.float64)
_RESERVED = ("step", "value")
_TABLE = ("step", "client", "value")
#: A per-client key: ``clients/<id>/<name>``.
_CLIENT_KEY = re.compile(r"^clients/(\d+)/(.+)$")
# Attrs that describe one rank only; run.h5 does not copy them from rank 0.
_RANK_ATTRS = ("rank", "role", "host", "device", "json_attrs")


#: How many series keep their datasets open between logs (least recently logged dropped first),
#: about 57 MB of open datasets at most (see _WRITER): per-client series are only array stats.
SERIES_CACHE = 1024


def rank_file(run_dir: str | Path, rank: int) -> Path:
    """Path of ``rank``'s metrics file inside ``run_dir``."""
    return Path(run_dir) / "metrics" / f"rank{rank:05d}.h5"


def _open(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    return h5py.File(path, mode, locking=False, **kwargs)


# The writer keeps no chunk cache: it only appends a row at a time, each straight to the file. That
# takes an open dataset from ~97 KB to ~28 KB and a flush of 2000 open series from 57 ms to 7 ms,
# at the same speed per row (docs/benchmarks.md, tenth session).
_WRITER = {"rdcc_nbytes": 0}


def _write_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    json_names = set(json.loads(f.attrs.get("json_attrs", "[]")))
    for name, value in attrs.items():
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            f.attrs[name] = json.dumps(value, default=str, sort_keys=True)
            json_names.add(name)
        else:
            f.attrs[name] = str(value) if isinstance(value, Path) else value
            json_names.discard(name)
    f.attrs["json_attrs"] = json.dumps(sorted(json_names))


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or any(not p for p in parts):
        raise ValueError(f"bad metric key {key!r}: empty path segment")
    if parts[0] == "events" or any(p in _TABLE for p in parts):
        raise ValueError(f"bad metric key {key!r}: 'events', 'step', 'client' and 'value' are reserved")


class MetricsWriter:
    """Appends one rank's metrics to ``RUN_DIR/metrics/rank{rank:05d}.h5``.

    A new file is created unless one exists: then ``resume_round`` (the last
    completed round) must be given, rows logged for later rounds are dropped
    and logging continues, so every completed round appears exactly once.
    Without ``resume_round`` an existing file is never overwritten: that
    raises :class:`UserError`. Usable as a context manager.
    """

    def __init__(self, run_dir: str | Path, rank: int, *, role: str,
                 attrs: Mapping[str, Any], resume_round: int | None = None) -> None:
        self.path = rank_file(run_dir, rank)
        # Open handles of recently logged series, at most SERIES_CACHE: every open
        # dataset costs ~28 KB (see _WRITER) and slows each flush, and a host of 5000
        # virtual clients may log an array stat per client (the scalars go to tables).
        self._series: collections.OrderedDict[str, tuple[h5py.Dataset, h5py.Dataset]] = collections.OrderedDict()
        self._kinds: dict[str, str] = {}  # attr reads are slow; cache each key's kind
        # The client tables' rows of the round in progress, (step, client, value) by name, written at the flush
        self._held: dict[str, list[tuple[int, int, float]]] = {}
        if self.path.exists():
            if resume_round is None:
                raise UserError(f"metrics file {self.path} already exists; resume that run "
                                "with --resume or choose a new --run-dir")
            try:
                self._f = _open(self.path, "r+", **_WRITER)
            except OSError as e:
                raise UserError(f"cannot open metrics file {self.path} to resume ({e}); "
                                "move it aside to start its metrics afresh") from e
            found = int(self._f.attrs.get("schema_version", 0))
            if found > SCHEMA_VERSION:
                self._f.close()
                raise UserError(f"metrics file {self.path} has schema version {found}, newer "
                                f"than this code's {SCHEMA_VERSION}; update sfprompt_mpi")
            self._truncate_after(resume_round)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = _open(self.path, "w-", **_WRITER)
        if "events" not in self._f:  # absent too in a file whose creator died at once
            self._f.create_dataset("events", shape=(0,), maxshape=(None,),
                                   dtype=_EVENT_DTYPE, chunks=(64,))
        _write_attrs(self._f, {**attrs, "rank": int(rank), "role": role,
                               "schema_version": SCHEMA_VERSION})
        if resume_round is not None:
            self.event(resume_round, "resume", f"resumed after round {resume_round}")
        self._f.flush()

    # -- writing ---------------------------------------------------------
    def log(self, metrics: Mapping[str, float | int | Sequence[float] | np.ndarray],
            step: int, *, flush: bool = True) -> None:
        """Append ``metrics`` (key -> scalar or 1-D array) for round ``step``; flush unless told not to.

        Several logs of one round may skip the flush when the round's last one
        flushes: a crash then loses at most the round in progress."""
        self._check_open()
        arrays = {key: np.asarray(raw, dtype=np.float64) for key, raw in metrics.items()}
        rows: list[tuple[str, int, float]] = []
        for key, value in list(arrays.items()):  # check all before writing any
            if value.ndim > 1:
                raise ValueError(f"metric {key!r}: scalars and 1-D arrays only, not {value.shape}")
            if key not in self._series:
                _check_key(key)
            client = _CLIENT_KEY.match(key)
            if client is None:
                continue
            if value.ndim == 0 and key not in self._kinds:  # (in _kinds: a series, as arrays were before)
                rows.append((client[2], int(client[1]), float(value)))
                del arrays[key]
            elif value.ndim and (client[2] in self._held or f"clients/{client[2]}/client" in self._f):
                raise ValueError(f"metric {key!r} was logged as scalar, now shape {value.shape}")
        for name, cid, value in rows:
            self._held.setdefault(name, []).append((step, cid, value))
        step_1 = np.array([step], dtype=np.int64)
        for key, value in arrays.items():
            steps, values = self._series_for(key, value)
            _append(self._fit(key, values, value), value)
            _append(steps, step_1[0])
        if flush:
            self._flush()

    def event(self, step: int, kind: str, text: str) -> None:
        """Append a row (step, kind, text) to ``/events``, e.g. a dropout; flush."""
        self._check_open()
        ds = self._f["events"]
        n = ds.shape[0]
        ds.resize((n + 1,))
        ds[n] = (int(step), str(kind), str(text))
        self._flush()

    def close(self) -> None:
        """Flush and close the file; later calls do nothing."""
        if getattr(self, "_f", None) is not None and self._f.id.valid:
            self._flush()
            self._f.close()
        self._series.clear()
        self._kinds.clear()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------
    def _check_open(self) -> None:
        if not self._f.id.valid:
            raise ValueError(f"metrics file {self.path} is closed")

    def _flush(self) -> None:
        """Write the held client rows, one append per table, and flush the file."""
        for name, rows in self._held.items():
            grp = self._f.get(f"clients/{name}")
            if grp is None or "client" not in grp:
                grp = self._f.require_group(f"clients/{name}")
                for column, dtype in zip(_TABLE, ("i8", "i8", "f8")):
                    grp.create_dataset(column, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
            for column, values in zip(_TABLE, zip(*rows)):
                _append_rows(grp[column], np.array(values, dtype=grp[column].dtype))
        self._held.clear()
        self._f.flush()

    def _series_for(self, key: str, first: np.ndarray) -> tuple[h5py.Dataset, h5py.Dataset]:
        found = self._series.get(key)
        if found is not None:
            self._series.move_to_end(key)
            return found
        found = self._get_series(key, first)
        while len(self._series) > SERIES_CACHE:
            self._series.popitem(last=False)
        return found

    def _get_series(self, key: str, first: np.ndarray) -> tuple[h5py.Dataset, h5py.Dataset]:
        if key in self._kinds:  # logged before and dropped from the cache: open its two datasets directly
            found = tuple(h5py.Dataset(h5py.h5d.open(self._f.id, f"{key}/{n}".encode())) for n in _RESERVED)
            self._series[key] = found  # type: ignore[assignment]
            return found  # type: ignore[return-value]
        if key in self._f and "step" in self._f[key]:
            grp = self._f[key]
        else:
            grp = self._f.require_group(key)
            grp.create_dataset("step", shape=(0,), maxshape=(None,), dtype="i8",
                               chunks=(256,), fillvalue=-1)
            if first.ndim == 0:
                ds = grp.create_dataset("value", shape=(0,), maxshape=(None,),
                                        dtype="f8", chunks=(256,))
                ds.attrs["kind"] = "scalar"
            elif first.size == 0:
                ds = grp.create_dataset("value", shape=(0,), maxshape=(None,),
                                        dtype=_VLEN_F64, chunks=(64,))
                ds.attrs["kind"] = "vlen"
            else:
                k = first.shape[0]
                ds = grp.create_dataset("value", shape=(0, k), maxshape=(None, k), dtype="f8",
                                        chunks=(max(1, 4096 // k), k))
                ds.attrs["kind"] = "fixed"
        self._series[key] = (grp["step"], grp["value"])
        return self._series[key]

    def _fit(self, key: str, ds: h5py.Dataset, value: np.ndarray) -> h5py.Dataset:
        """Return a value dataset that can take ``value``; fixed -> vlen on a length change."""
        if key not in self._kinds:
            self._kinds[key] = str(ds.attrs.get("kind", "scalar"))
        kind = self._kinds[key]
        if (kind == "scalar") != (value.ndim == 0):
            raise ValueError(f"metric {key!r} was logged as {kind}, now shape {value.shape}")
        if kind != "fixed" or value.shape[0] == ds.shape[1]:
            return ds
        old = ds[...]
        grp = ds.parent
        del grp["value"]
        new = grp.create_dataset("value", shape=(old.shape[0],), maxshape=(None,),
                                 dtype=_VLEN_F64, chunks=(64,))
        for i, row in enumerate(old):
            new[i] = row
        new.attrs["kind"] = self._kinds[key] = "vlen"
        self._series[key] = (grp["step"], new)
        return new

    def _truncate_after(self, last_round: int) -> None:
        """Drop rows with step > ``last_round`` (a round that never completed)."""
        def visit(grp: h5py.Group) -> None:
            for name, obj in grp.items():
                if isinstance(obj, h5py.Group):
                    if "step" in obj and "value" in obj:
                        _keep_rows(obj["step"][...] <= last_round, *(obj[n] for n in _TABLE if n in obj))
                    visit(obj)
        visit(self._f)
        if "events" in self._f:
            ev = self._f["events"]
            _keep_rows(ev["step"] <= last_round, ev)


def _append(ds: h5py.Dataset, row: np.ndarray) -> None:
    """Append one row to a resizable dataset."""
    if ds.dtype == _VLEN_F64:
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = row
        return
    _append_rows(ds, np.asarray(row, dtype=ds.dtype).reshape((1, *ds.shape[1:])))


def _append_rows(ds: h5py.Dataset, rows: np.ndarray) -> None:
    """Append ``rows`` (n, ...) to a resizable dataset of scalar or fixed-length rows, through h5py's
    low-level calls: a fifth of the time of ``resize`` plus item assignment."""
    dsid = ds.id
    shape = dsid.shape
    dsid.set_extent((shape[0] + len(rows), *shape[1:]))
    file_space = dsid.get_space()
    file_space.select_hyperslab((shape[0], *(0 for _ in shape[1:])), (len(rows), *shape[1:]))
    mem = np.ascontiguousarray(rows, dtype=ds.dtype)
    dsid.write(h5py.h5s.create_simple(mem.shape), file_space, mem)


def _keep_rows(keep: np.ndarray, *datasets: h5py.Dataset) -> None:
    """Keep only the rows where ``keep`` is true (and no row past the shortest dataset)."""
    n = min(ds.shape[0] for ds in datasets)
    keep = keep[:n]
    if keep.all() and all(ds.shape[0] == n for ds in datasets):
        return
    for ds in datasets:
        kept = ds[:n][keep]
        ds.resize(len(kept), axis=0)
        if ds.dtype == _VLEN_F64:  # h5py writes vlen rows one at a time
            for i, row in enumerate(kept):
                ds[i] = row
        elif len(kept):
            ds[...] = kept


def link_rank_files(run_dir: str | Path, world_size: int,
                    attrs: Mapping[str, Any] | None = None) -> Path:
    """Create or refresh ``RUN_DIR/run.h5``: an external link per rank, run-wide attrs.

    Links are relative (``metrics/rankNNNNN.h5``) so the run directory can be
    moved. Attrs are ``attrs`` if given, else read from rank 0's file when it
    is readable, minus per-rank ones (rank, role, host, device). The file is
    written aside and renamed, so a reader never sees it half-written.
    """
    run_dir = Path(run_dir)
    if attrs is None:
        try:
            attrs = read_attrs(rank_file(run_dir, 0))
        except (OSError, KeyError):
            attrs = {}
    shared = {k: v for k, v in attrs.items() if k not in _RANK_ATTRS}
    target = run_dir / "run.h5"
    tmp = run_dir / f".run.h5.tmp{os.getpid()}"
    with _open(tmp, "w") as f:
        _write_attrs(f, {**shared, "world_size": int(world_size),
                         "schema_version": SCHEMA_VERSION})
        for rank in range(world_size):
            f[f"rank{rank:05d}"] = h5py.ExternalLink(f"metrics/rank{rank:05d}.h5", "/")
    os.replace(tmp, target)
    return target


# -- reading ---------------------------------------------------------------
def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{key: (steps, values)}`` from a rank file or from ``run.h5``.

    Through ``run.h5`` keys are prefixed with the rank (``rank00001/...``) and
    links to missing rank files are skipped. Safe on a live or crashed run's
    file: rows whose step was never written are dropped. ``values`` is 1-D for
    scalars, 2-D for fixed-length arrays, an object array of 1-D arrays for
    variable-length ones. A client table ``clients/<name>`` comes back as one
    series ``clients/<id>/<name>`` per client (joined, in round order, with
    the rows of a schema-1 series of that key in a file resumed from one).
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add(key: str, steps: np.ndarray, values: np.ndarray) -> None:
        if key in out:  # the rounds before a resume as a series, those after in a table
            steps, values = np.concatenate([out[key][0], steps]), np.concatenate([out[key][1], values])
            order = np.argsort(steps, kind="stable")
            steps, values = steps[order], values[order]
        out[key] = (steps, values)

    def visit(grp: h5py.Group, prefix: str, root: str) -> None:
        for name in grp:
            try:
                obj = grp[name]
            except (KeyError, OSError):  # dangling external link: rank file missing
                continue
            if not isinstance(obj, h5py.Group):
                continue
            key = prefix + name
            columns = [obj.get(n) for n in _TABLE]
            if all(isinstance(c, h5py.Dataset) for c in columns) and key.startswith(f"{root}clients/"):
                steps, clients, values = _written(*columns)
                by_client = np.argsort(clients, kind="stable")
                ids, starts = np.unique(clients[by_client], return_index=True)
                rest = key[len(f"{root}clients/"):]
                for cid, rows in zip(ids, np.split(by_client, starts[1:])):
                    add(f"{root}clients/{cid}/{rest}", steps[rows], values[rows])
            elif all(isinstance(c, h5py.Dataset) for c in (columns[0], columns[2])):
                add(key, *_written(columns[0], columns[2]))
            visit(obj, f"{key}/", f"{key}/" if "schema_version" in obj.attrs else root)

    with _open(Path(path), "r") as f:
        visit(f, "", "")
    return out


def _written(steps: h5py.Dataset, *columns: h5py.Dataset) -> list[np.ndarray]:
    """The rows of a series or table whose step was written (a live or crashed writer's file may hold
    more rows in one column than another, or a row not yet filled in): its steps, then its columns."""
    arrays = [steps[...], *(c[...] for c in columns)]
    n = min(map(len, arrays))
    ok = arrays[0][:n] >= 0
    return [arrays[0][:n][ok].astype(np.int64), *(a[:n][ok] for a in arrays[1:])]


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Return the root attrs of a metrics file, JSON-encoded ones decoded."""
    with _open(Path(path), "r") as f:
        raw = {k: f.attrs[k] for k in f.attrs}
    json_names = json.loads(raw.pop("json_attrs", "[]"))
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = json.loads(v) if k in json_names else v
    return out


def read_events(path: str | Path) -> list[tuple[int, str, str]]:
    """Return the ``/events`` rows (step, kind, text) of a rank file, in order."""
    with _open(Path(path), "r") as f:
        if "events" not in f:
            return []
        rows = f["events"][...]

    def s(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)
    return [(int(r["step"]), s(r["kind"]), s(r["text"])) for r in rows]
