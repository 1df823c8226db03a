"""Benchmarks: every suite runs on a tiny configuration and produces well-formed output.

Each suite is launched as a user starts it (``python -m sfprompt_mpi.bench
SUITE --json OUT``; the MPI suites start ``mpiexec`` themselves), bounded
by ``run_bounded``. The tests check the shape of the output (a table, the key
ratio as the last line, JSON rows and key), never a speed.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from sfprompt_mpi.bench.common import format_table, parse_size
from sfprompt_mpi.bench.job import RoundClock
from sfprompt_mpi.errors import UserError

from run_helpers import run_bounded  # tests/mpi, on sys.path via tests/conftest.py

TIMEOUT_S = 180
TINY_RUN = ["--max-train-samples", "120", "--max-test-samples", "50", "--batch-size", "16"]


def bench(*args: str):
    return run_bounded([sys.executable, "-m", "sfprompt_mpi.bench", *args], TIMEOUT_S)


def run_suite(tmp_path, suite: str, *args: str) -> dict:
    out = tmp_path / f"{suite}.json"
    done = bench(suite, "--json", str(out), *args)
    assert done.returncode == 0, done.report()
    last = done.output.strip().splitlines()[-1]
    assert last.startswith(f"{suite}: "), done.report()
    result = json.loads(out.read_text())
    assert result["suite"] == suite and result["rows"] and result["key"] in last
    assert isinstance(result["value"], float) and math.isfinite(result["value"]) and result["value"] > 0
    assert f"{result['value']:.3f}" in last
    return result


# ------------------------------------------------------------------ the CLI


def test_help_lists_every_suite():
    done = bench("--help")

    assert done.returncode == 0, done.report()
    for suite in ("transport", "server", "round", "scale", "wire", "limit", "peers"):
        assert suite in done.output


@pytest.mark.parametrize("args, words", [
    (["nosuch"], "invalid choice"),
    (["transport", "--min-size", "3"], "multiple of 4"),
    (["scale", "--clients", "0,5"], "must be >= 1"),
    (["wire", "--dtypes", "float8"], "float32, bfloat16"),
    (["limit", "--algos", "nosuch"], "registered algorithms"),
    (["limit", "--procs", "5", "--clients", "4"], "--procs <= --clients"),
    (["peers", "--python", "/nonexistent/python"], "cannot start /nonexistent/python"),
    (["peers", "--peers", "fedml"], "choose among flower, pfl, pfl-torchrun"),
])
def test_user_error_is_one_line_and_exit_2(args, words):
    done = bench(*args)

    assert done.returncode == 2, done.report()
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], done.report()
    assert "Traceback" not in done.output


def test_helpers():
    assert parse_size("4K") == 4096 and parse_size("64M") == 64 << 20 and parse_size("100") == 100
    with pytest.raises(UserError):
        parse_size("lots")
    table = format_table([{"a": 1, "b": 0.5}, {"a": 22, "c": "x"}]).splitlines()
    assert table[0].split() == ["a", "b", "c"] and len(table) == 3


def test_round_clock_splits_each_round_into_its_parts():
    clock = RoundClock()
    clock.boundary(True, 1, 10.0)
    clock.add("send_s", 0.5)
    clock.add("wait_s", 1.0)
    clock.add("payload_s", 0.25)
    clock.boundary(True, 1, 11.0)               # a second START of the same round (another host)
    clock.boundary(True, 2, 14.0)               # round 2 (any attempt)
    clock.boundary(False, 0, 15.0)              # STOP

    assert clock.rounds[1] == {"send_s": 0.5, "wait_s": 1.0, "payload_s": 0.25, "wall_s": 4.0, "compute_s": 2.25}
    assert clock.rounds[2]["wall_s"] == 1.0 and clock.rounds[2]["compute_s"] == 1.0


# ------------------------------------------------------------------ suites


@pytest.mark.mpi
def test_transport_suite(tmp_path):
    result = run_suite(tmp_path, "transport", "--max-size", "256K", "--trials", "1", "--target", "1M")

    assert [r["bytes"] for r in result["rows"]] == [4096, 16384, 65536, 262144]
    for row in result["rows"]:
        assert row["raw_GBps"] > 0 and row["project_GBps"] > 0
        assert row["ratio"] == pytest.approx(row["project_GBps"] / row["raw_GBps"])
    assert result["value"] == pytest.approx(min(r["ratio"] for r in result["rows"]))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_server_suite(tmp_path, dtype):
    result = run_suite(tmp_path, "server", "--clients", "3", "--server-batch", "2", "--batch-size", "8",
                       "--steps", "2", "--rounds", "1", "--trials", "1", "--server-dtype", dtype)

    alone = [r for r in result["rows"] if r["what"] == "body alone"]
    serving = [r for r in result["rows"] if r["what"].startswith("serving")]
    assert len(alone) >= 2 and len(serving) == 1
    assert result["best_alone_batch"] in [r["batch"] for r in alone]
    assert serving[0]["passes_per_round"] >= 3  # 3 clients x 2 steps, at most 2 clients per pass
    assert result["value"] == pytest.approx(serving[0]["samples_per_s"] / max(r["samples_per_s"] for r in alone))
    assert f"{dtype} compute" in result["notes"][0]


@pytest.mark.mpi
def test_round_suite(tmp_path):
    result = run_suite(tmp_path, "round", "--rounds", "2", "--", *TINY_RUN)

    runs = [(r["run"], r["role"]) for r in result["rows"]]
    assert runs == [("reference", "one process"), ("mpi", "server"), ("mpi", "clients"), ("mpi", "clients")]
    for row in result["rows"][1:]:
        parts = row["compute_s"] + row["comm_s"] + row["wait_s"]
        assert row["comm_s"] >= 0 and row["wait_s"] >= 0
        assert parts == pytest.approx(row["round_s"], rel=1e-6)
    assert result["same_params"] is True


@pytest.mark.mpi
def test_scale_suite(tmp_path):
    result = run_suite(tmp_path, "scale", "--clients", "4,8", "--samples-per-client", "4", "--rounds", "1")

    assert [r["clients"] for r in result["rows"]] == [4, 8]
    assert [r["samples"] for r in result["rows"]] == [16, 32]
    for row in result["rows"]:
        assert row["round_s"] > 0 and row["server_peak_rss_mb"] > 0 and row["client_peak_rss_mb"] > 0
    assert math.isfinite(result["server_mem_ratio"])


@pytest.mark.mpi
def test_wire_suite(tmp_path):
    result = run_suite(tmp_path, "wire", "--dtypes", "float32,bfloat16", "--",
                       "--rounds", "1", "--clients", "2", *TINY_RUN)

    f32, bf16 = result["rows"]
    assert (f32["wire_dtype"], bf16["wire_dtype"]) == ("float32", "bfloat16")
    assert bf16["MB_activations"] == pytest.approx(f32["MB_activations"] / 2, rel=0.02)
    assert bf16["MB_total"] < f32["MB_total"]
    assert result["value"] == pytest.approx(bf16["bytes_ratio"]) and 0 < result["value"] < 1
    assert -1 <= result["acc_change"] <= 1


@pytest.mark.mpi
def test_limit_suite_restates_sfprompt_bitwise_in_one_process_and_on_all_cores(tmp_path):
    # Execute: the suite as a user starts it (run and plain loop, each in one process and on 2 client
    # processes); fl-full's arithmetic is checked in this process below, which costs no process starts
    result = run_suite(tmp_path, "limit", "--algos", "sfprompt", "--rounds", "2", "--clients", "2", "--procs", "2",
                       "--repeats", "1", "--", *TINY_RUN)

    assert [(r["algo"], r["mode"]) for r in result["rows"]] == [("sfprompt", "1 process"), ("sfprompt", "2 processes")]
    for row in result["rows"]:
        # the plain loop does the very arithmetic of the run: the same final parameters, bit for bit
        assert row["same_params"] is True and row["plain_acc"] == row["ours_acc"]
        assert row["plain/ours"] == pytest.approx(row["plain_round_s"] / row["ours_round_s"])
    assert result["value"] == pytest.approx(min(r["plain/ours"] for r in result["rows"]))


def test_plain_loop_ends_with_the_reference_runs_parameters_for_fl_full(tmp_path):
    from safetensors.torch import load_file

    from sfprompt_mpi.bench.plain import run_plain
    from sfprompt_mpi.run import main
    flags = ["--algo", "fl-full", "--clients", "2", "--rounds", "2", "--threads", "1", *TINY_RUN]
    # Execute: the reference run and the plain loop, both in this process
    assert main([*flags, "--reference", "--run-dir", str(tmp_path / "ref")]) == 0
    plain = run_plain(flags, 1)
    # Assert: every trained tensor equal, bit for bit
    run = load_file(str(tmp_path / "ref" / "checkpoint" / "global.safetensors"))
    assert plain["final"].keys() == run.keys()
    assert all(torch.equal(plain["final"][k], run[k]) for k in run)
    assert plain["procs"] == 1 and len(plain["round_s"]) == 2


def test_peers_suite_without_the_extra_is_one_line_and_exit_2(tmp_path):
    # Prepare: a Python whose flwr cannot be imported, whatever this environment holds
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "__init__.py").write_text("raise ImportError(\"No module named 'flwr'\")\n")
    # Execute
    done = run_bounded([sys.executable, "-m", "sfprompt_mpi.bench", "peers", "--clients", "4"], TIMEOUT_S,
                       env={"PYTHONPATH": str(tmp_path)})
    # Assert
    assert done.returncode == 2, done.report()
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "peers extra" in errors[0] and "pip install -e '.[peers]'" in errors[0], done.report()
    assert "Traceback" not in done.output


def test_pfl_torchrun_starts_one_pfl_worker_per_cpu_and_only_the_first_writes_the_report(tmp_path, monkeypatch):
    from sfprompt_mpi.bench import peer_jobs
    from sfprompt_mpi.bench.peers import peer_command
    # Prepare: the peer's job replaced by one that reports which worker ran it
    flags = ["--algo", "fl-full", "--clients", "4"]
    monkeypatch.setattr(peer_jobs, "run_pfl", lambda argv: {"argv": argv, "round_s": [1.0], "test_acc": 0.5})
    report = tmp_path / "r.json"
    # Execute: the command lines, and the job as the second and the first worker
    one = peer_command("py", "pfl", report, flags, 2)
    two = peer_command("py", "pfl-torchrun", report, flags, 2)
    monkeypatch.setenv("RANK", "1")
    assert peer_jobs.peer_main(["pfl", "--report", str(report), "--", *flags]) == 0
    second_wrote = report.exists()
    monkeypatch.setenv("RANK", "0")
    assert peer_jobs.peer_main(["pfl", "--report", str(report), "--", *flags]) == 0
    # Assert: the same job, once in one process and once under torchrun with a worker per CPU
    job = ["-m", "sfprompt_mpi.bench", "_peer", "pfl", "--report", str(report), "--", *flags]
    assert one == ["py", *job]
    assert two == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2", *job]
    assert not second_wrote and json.loads(report.read_text())["argv"] == flags


def test_peers_rows_hold_our_one_process_against_the_peers_in_one_process_and_every_core_against_all():
    from sfprompt_mpi.bench.peers import _rows
    # Prepare: two repetitions at one count; pfl in one process, Flower and pfl's workers on every core
    times = {"ours, 1 process": (2.0, 2.2), "ours, 3 ranks": (1.2, 1.4), "flower": (1.8, 1.6),
             "pfl": (1.6, 1.7), "pfl, 2 workers (torchrun)": (1.0, 1.1)}
    trials = [{"clients": 4, "who": who, "round_s": t, "acc": 0.5, **({} if who.startswith("ours") else
               {"one_process": who == "pfl"})} for who, pair in times.items() for t in pair]
    # Execute
    rows = {r["who"]: r for r in _rows(trials, [4])}
    # Assert: medians of the repetitions; 1.65 / 2.1 against pfl alone, 1.05 / 1.3 against pfl's workers
    assert rows["ours, 1 process"]["peer/ours"] == pytest.approx(1.65 / 2.1)
    assert rows["ours, 3 ranks"]["peer/ours"] == pytest.approx(1.05 / 1.3)
    assert "peer/ours" not in rows["flower"] and rows["flower"]["round_s"] == pytest.approx(1.7)
