"""Per-rank HDF5 metrics: schema, flushing, resume, links, events."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from sfprompt_mpi.errors import UserError
from sfprompt_mpi.metrics.h5 import (SCHEMA_VERSION, MetricsWriter, link_rank_files,
                                     rank_file, read_attrs, read_events, read_metrics)

ATTRS = {"config": "[run]\nseed = 1\n", "versions": {"torch": "2.11", "mpi": "MPICH 4.2"},
         "host": "node01", "device": "cpu"}


def _writer(run_dir, rank=0, role="server", **kw):
    return MetricsWriter(run_dir, rank, role=role, attrs=ATTRS, **kw)


def test_schema_attrs_and_datasets(tmp_path):
    with _writer(tmp_path) as w:
        w.log({"test_acc": 0.5, "bytes_sent/acts": 1024, "agg_weights": [0.25, 0.75]}, step=1)

    path = rank_file(tmp_path, 0)
    attrs = read_attrs(path)
    with h5py.File(path, "r") as f:
        step, value = f["test_acc/step"], f["test_acc/value"]
        nested, arr = f["bytes_sent/acts/value"], f["agg_weights/value"]
        shapes = (step.dtype, value.dtype, step.maxshape, nested.shape, arr.shape, arr.maxshape)

    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["versions"] == {"torch": "2.11", "mpi": "MPICH 4.2"}
    assert attrs["config"] == ATTRS["config"]
    assert (attrs["rank"], attrs["role"], attrs["host"]) == (0, "server", "node01")
    assert shapes == (np.int64, np.float64, (None,), (1,), (1, 2), (None, 2))


def test_append_visible_to_reader_while_writer_open(tmp_path):
    w = _writer(tmp_path)
    seen = []
    for r in (1, 2, 3):
        w.log({"test_acc": 0.1 * r}, step=r)
        seen.append(read_metrics(rank_file(tmp_path, 0))["test_acc"])
    w.close()

    steps, values = seen[-1]
    assert [len(s) for s, _ in seen] == [1, 2, 3]
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_allclose(values, [0.1, 0.2, 0.3])


def test_many_series_keep_few_open_and_every_row(tmp_path, monkeypatch):
    # A host of many virtual clients logs far more series than it keeps open; reopened ones append.
    monkeypatch.setattr("sfprompt_mpi.metrics.h5.SERIES_CACHE", 4)
    w = _writer(tmp_path, 1, "client")
    for r in (1, 2, 3):
        for cid in range(10):
            w.log({f"clients/{cid}/loss": r + cid / 100, f"clients/{cid}/kept": [cid, r]}, step=r, flush=False)
            assert len(w._series) <= 4
        w.log({"peak_mem_mb": 1.0}, step=r)  # the round's row flushes the round
        rows = read_metrics(rank_file(tmp_path, 1))
        assert len(rows["clients/9/loss"][0]) == r  # visible to a reader once the round's row is flushed
    w.close()

    rows = read_metrics(rank_file(tmp_path, 1))
    assert len([k for k in rows if k.startswith("clients/")]) == 20
    np.testing.assert_array_equal(rows["clients/7/loss"][0], [1, 2, 3])
    np.testing.assert_allclose(rows["clients/7/loss"][1], [1.07, 2.07, 3.07])
    np.testing.assert_array_equal(rows["clients/3/kept"][1], [[3, 1], [3, 2], [3, 3]])


def test_clients_scalars_go_to_one_table_per_name_and_read_back_as_series(tmp_path):
    # Prepare: a host of 5 clients, 3 rounds; client 4 skips round 2; one array stat stays a series
    w = _writer(tmp_path, 1, "client")
    for r in (1, 2, 3):
        for cid in range(5):
            if (r, cid) != (2, 4):
                w.log({f"clients/{cid}/loss": r + cid / 10, f"clients/{cid}/time/train": 0.5 * cid,
                       f"clients/{cid}/kept": [cid, r]}, step=r, flush=False)
        with h5py.File(rank_file(tmp_path, 1), "r", locking=False) as f:
            held = len(f["clients/loss/client"]) if "clients/loss" in f else 0
        w.log({"peak_mem_mb": 1.0}, step=r)  # the round's row writes the held rows
        # Assert (as it runs): nothing of the round is in the file before its flush, all of it after
        assert held == (0, 5, 9)[r - 1], (r, held)
    w.close()
    # Assert: one table per scalar name, a row per client and round; the array stat per client
    with h5py.File(rank_file(tmp_path, 1), "r") as f:
        table = {c: f[f"clients/time/train/{c}"][...] for c in ("step", "client", "value")}
        per_client = sorted(k for k in f["clients"] if k.isdigit())
        assert "loss" not in f["clients/3"] and "kept" in f["clients/3"]
    assert table["step"].tolist() == [1] * 5 + [2] * 4 + [3] * 5
    assert table["client"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert per_client == ["0", "1", "2", "3", "4"]
    rows = read_metrics(rank_file(tmp_path, 1))
    np.testing.assert_array_equal(rows["clients/4/loss"][0], [1, 3])
    np.testing.assert_allclose(rows["clients/4/loss"][1], [1.4, 3.4])
    np.testing.assert_allclose(rows["clients/2/time/train"][1], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(rows["clients/2/kept"][1], [[2, 1], [2, 2], [2, 3]])
    link_rank_files(tmp_path, 2)  # through run.h5: the same series under the rank's prefix
    through = read_metrics(tmp_path / "run.h5")
    np.testing.assert_array_equal(through["rank00001/clients/4/loss"][1], rows["clients/4/loss"][1])


def test_a_schema_1_file_resumed_reads_as_one_series_per_client(tmp_path):
    # Prepare: a schema-1 host file (every client's scalar a series of its own) with rounds 1-3
    path = rank_file(tmp_path, 1)
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 1
        for cid in (0, 1):
            f.create_dataset(f"clients/{cid}/loss/step", data=[1, 2, 3], maxshape=(None,), chunks=(256,))
            f.create_dataset(f"clients/{cid}/loss/value", data=[1.0 + cid, 2.0 + cid, 3.0 + cid],
                             maxshape=(None,), chunks=(256,)).attrs["kind"] = "scalar"
    # Execute: resumed after round 2 (round 3 never completed), rounds 3 and 4 logged anew
    with _writer(tmp_path, 1, "client", resume_round=2) as w:
        for r in (3, 4):
            w.log({"clients/0/loss": 10.0 * r, "clients/1/loss": 20.0 * r}, step=r)
    # Assert: each client's series holds every round once, in order
    rows = read_metrics(path)
    np.testing.assert_array_equal(rows["clients/1/loss"][0], [1, 2, 3, 4])
    np.testing.assert_allclose(rows["clients/1/loss"][1], [2.0, 3.0, 60.0, 80.0])
    np.testing.assert_allclose(rows["clients/0/loss"][1], [1.0, 2.0, 30.0, 40.0])


def test_a_client_stat_keeps_its_kind(tmp_path):
    with _writer(tmp_path, 1, "client") as w:
        w.log({"clients/0/loss": 1.0}, step=1)
        with pytest.raises(ValueError, match="logged as scalar"):
            w.log({"clients/1/loss": [1.0, 2.0]}, step=1)
        with pytest.raises(ValueError, match="reserved"):
            w.log({"clients/1/client": 1.0}, step=1)


def test_writer_keeps_no_chunk_cache_and_a_reader_sees_every_row(tmp_path):
    # Prepare: scalar, fixed and changing-length series, written with HDF5's chunk cache off
    w = _writer(tmp_path, 1, "client")
    # Execute
    for r in range(1, 301):  # more rows than one chunk holds
        w.log({"loss": r / 10, "kept": [r, -r], "grown": list(range(r % 3))}, step=r, flush=r % 50 == 0)
    # Assert: the writer's file has no chunk cache, and every row is on disk after the flushes
    assert w._f.id.get_access_plist().get_cache()[2] == 0
    rows = read_metrics(rank_file(tmp_path, 1))
    np.testing.assert_array_equal(rows["loss"][0], np.arange(1, 301))
    np.testing.assert_allclose(rows["loss"][1], np.arange(1, 301) / 10)
    assert rows["kept"][1].shape == (300, 2) and rows["kept"][1][-1].tolist() == [300, -300]
    assert [len(v) for v in rows["grown"][1][:4]] == [1, 2, 0, 1]
    w.close()


def test_resume_drops_partial_round(tmp_path):
    with _writer(tmp_path, 1, "client") as w:
        for r in (1, 2, 3):
            w.log({"clients/3/local_loss": float(r), "selected": np.arange(r)}, step=r)
            w.event(r, "dropout", f"client 7 in round {r}")

    with _writer(tmp_path, 1, "client", resume_round=2) as w:
        w.log({"clients/3/local_loss": 30.0, "selected": np.arange(3)}, step=3)
        w.event(3, "dropout", "again")
    m = read_metrics(rank_file(tmp_path, 1))
    events = read_events(rank_file(tmp_path, 1))

    steps, values = m["clients/3/local_loss"]
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(values, [1.0, 2.0, 30.0])
    sel_steps, sel = m["selected"]  # lengths changed, so stored as vlen
    np.testing.assert_array_equal(sel_steps, [1, 2, 3])
    assert [list(s) for s in sel] == [[0], [0, 1], [0, 1, 2]]
    assert [e for e in events if e[1] == "dropout"] == [
        (1, "dropout", "client 7 in round 1"), (2, "dropout", "client 7 in round 2"),
        (3, "dropout", "again")]
    assert (2, "resume", "resumed after round 2") in events


def test_refuses_to_overwrite(tmp_path):
    _writer(tmp_path).close()

    with pytest.raises(UserError, match="already exists"):
        _writer(tmp_path)


def test_run_h5_links_resolve_after_move(tmp_path):
    run = tmp_path / "run"
    for rank in range(3):
        with _writer(run, rank, "server" if rank == 0 else "client") as w:
            w.log({"peak_mem_mb": 100.0 + rank}, step=1)
    link_rank_files(run, 3)
    moved = tmp_path / "moved"
    shutil.move(run, moved)

    m = read_metrics(moved / "run.h5")
    attrs = read_attrs(moved / "run.h5")

    assert {k: v[1].tolist() for k, v in m.items()} == {
        f"rank{r:05d}/peak_mem_mb": [100.0 + r] for r in range(3)}
    assert attrs["world_size"] == 3 and attrs["config"] == ATTRS["config"]
    assert "rank" not in attrs and "host" not in attrs


def test_run_h5_skips_missing_rank_file(tmp_path):
    with _writer(tmp_path) as w:
        w.log({"test_acc": 0.9}, step=1)
    link_rank_files(tmp_path, 2)

    assert list(read_metrics(tmp_path / "run.h5")) == ["rank00000/test_acc"]


def test_events_and_bad_values(tmp_path):
    with _writer(tmp_path) as w:
        w.event(4, "rejected", "client 2 sent NaN in prompts")
        with pytest.raises(ValueError):
            w.log({"ok": 1.0, "x": np.zeros((2, 2))}, step=1)
        with pytest.raises(ValueError):
            w.log({"events/x": 1.0}, step=1)
        w.log({"y": 1.0}, step=1)
        with pytest.raises(ValueError):
            w.log({"y": [1.0, 2.0]}, step=2)

    assert read_events(rank_file(tmp_path, 0)) == [(4, "rejected", "client 2 sent NaN in prompts")]
    assert list(read_metrics(rank_file(tmp_path, 0))) == ["y"]  # nothing of a rejected call


def test_reads_file_of_killed_writer(tmp_path):
    code = (
        "import os, sys\n"
        "from sfprompt_mpi.metrics.h5 import MetricsWriter\n"
        "w = MetricsWriter(sys.argv[1], 2, role='client', attrs={})\n"
        "for r in (1, 2):\n"
        "    w.log({'clients/5/local_loss': r / 10}, step=r)\n"
        "os._exit(1)\n")

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=repo, timeout=60)
    steps, values = read_metrics(rank_file(tmp_path, 2))["clients/5/local_loss"]

    assert proc.returncode == 1
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_allclose(values, [0.1, 0.2])
