"""``python -m sfprompt_mpi.run`` without a launcher on every core (``sfprompt_mpi/launch.py``).

- the plan gives every rank the torch threads of the one-process run, or stays in one process;
- it stays in one process with --reference, under Slurm, for --dry-run, and on one CPU;
- started without mpiexec, the job starts its own ranks, says so, and ends bitwise where
  ``--reference`` ends; a user error found by the ranks is still one line and exit code 2 with
  nothing written; SIGTERM stops it after a round with exit code 4 and the same command continues.

``SFPROMPT_LAUNCH_RANKS=3`` fixes the ranks, so the launched tests run alike on any machine.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import sfprompt_mpi.launch as launch
from sfprompt_mpi.config import build_config, parse_config
from sfprompt_mpi.errors import EXIT_CONTINUE, UserError
from sfprompt_mpi.run import main

import run_helpers as helpers  # tests/mpi, on sys.path via tests/conftest.py

TINY = ["--rounds", "2", "--max-train-samples", "160", "--max-test-samples", "60", "--batch-size", "16",
        "--threads", "1"]
THREE = {"SFPROMPT_LAUNCH_RANKS": "3"}


def _params(run_dir):
    return load_file(str(run_dir / "checkpoint" / "global.safetensors"))


def _same(a, b) -> bool:
    x, y = _params(a), _params(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("cpus, clients, threads, ranks", [
    (2, 0, 0, 3),     # the default job on a laptop: 4 clients, 1 thread each -> server + 2 client ranks
    (2, 50, 0, 3),
    (16, 4, 0, 5),    # few clients on many cores: the reference takes 16 // 5 = 3 threads, and so does each rank
    (64, 50, 0, 51),
    (8, 50, 2, 5),    # --threads 2: 4 client ranks fill 8 cores
    (1, 4, 0, 0),     # one CPU: no second client rank would run at the same time
    (2, 1, 0, 0),     # one client: nothing to spread
])
def test_plan_gives_every_rank_the_threads_of_the_one_process_run(cpus, clients, threads, ranks):
    cfg = build_config({"fed": {"clients": clients}, "run": {"threads": threads}})

    got, why = launch.plan_ranks(cfg, cpus, mem_gb=None, floor_gb=0.42)

    assert got == ranks, why
    if ranks:
        n = clients or launch.REFERENCE_CLIENTS
        reference = threads or max(1, cpus // (n + 1))
        assert (threads or max(1, cpus // ranks)) == reference  # what world.torch_threads gives a rank


def test_plan_keeps_within_memory_or_stays_in_one_process():
    cfg = build_config({"fed": {"clients": 50}})

    assert launch.plan_ranks(cfg, 4, mem_gb=10.0, floor_gb=0.42)[0] == 5
    assert launch.plan_ranks(cfg, 4, mem_gb=1.8, floor_gb=0.42)[0] == 4    # 4 x 0.42 GB fit, still 1 thread each
    ranks, why = launch.plan_ranks(cfg, 2, mem_gb=1.0, floor_gb=0.42)
    assert ranks == 0 and "too few ranks" in why
    # 23 ranks fit in 10 GB, but 64 CPUs would give each 2 threads, not the reference's 1: one process
    assert launch.plan_ranks(cfg, 64, mem_gb=10.0, floor_gb=0.42)[0] == 0


@pytest.mark.parametrize("flags, env, words", [
    (["--reference"], {}, "one process (--reference)"),
    ([], {"SLURM_JOB_ID": "7"}, "under Slurm"),
    (["--dry-run"], {"SFPROMPT_LAUNCH_RANKS": "3"}, "the run would start mpiexec -n 3"),
    ([], {"SFPROMPT_LAUNCH_RANKS": "0"}, "one process:"),
])
def test_plan_stays_in_one_process_where_it_must(monkeypatch, flags, env, words):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    plan = launch.plan_launch(parse_config(flags))

    assert plan.ranks == 0 and words in plan.why, plan


@pytest.mark.mpi
def test_without_a_launcher_the_run_starts_its_own_ranks_and_ends_where_the_reference_ends(tmp_path):
    auto, ref = tmp_path / "auto", tmp_path / "ref"
    # default --server-batch 4: the ranks serve one client per pass all the same, as the reference does
    done = helpers.run_bounded([*helpers.python_run(), *TINY, "--run-dir", str(auto)], env=THREE)

    assert done.returncode == 0, done.report()
    assert "started its own 3 ranks with mpiexec" in done.output and "3 rank(s)" in done.output, done.report()
    assert sorted(p.name for p in (auto / "metrics").iterdir()) == [f"rank{r:05d}.h5" for r in range(3)]
    assert main([*TINY, "--reference", "--run-dir", str(ref)]) == 0
    assert _same(auto, ref)
    assert parse_config(["--config", str(auto / "config.toml")]).fed.clients == 0  # the command's own config


@pytest.mark.mpi
def test_a_user_error_the_ranks_find_is_one_line_and_exit_2_with_nothing_written(tmp_path):
    run_dir = tmp_path / "run"
    done = helpers.run_bounded([*helpers.python_run(), *TINY, "--dataset", "cifar10", "--data-dir",
                                str(tmp_path / "none"), "--run-dir", str(run_dir)], env=THREE)

    assert done.returncode == 2, done.report()
    errors = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cifar10" in errors[0], done.report()
    assert "Traceback" not in done.output and "BAD TERMINATION" not in done.output, done.report()
    assert not run_dir.exists()


@pytest.mark.mpi
def test_sigterm_stops_the_ranks_it_started_and_the_same_command_continues(tmp_path):
    run_dir, ref = tmp_path / "run", tmp_path / "ref"
    args = [*TINY, "--rounds", "4", "--run-dir", str(run_dir), "--client-timeout", "6",
            "--inject-fault", "slow@rank:1,round:2"]  # round 2 takes >= 3 s: the signal lands in a round
    proc = helpers.start_until_checkpoint(args, run_dir, 1, ranks=None, env=THREE)
    with helpers.reaped(proc):
        assert proc.poll() is None, "the run ended or never reached round 1"
        os.kill(proc.pid, signal.SIGTERM)  # the command's own pid: mpiexec since the exec
        ended_after, output = helpers.wait_for(proc, 90)

    assert proc.returncode == EXIT_CONTINUE and ended_after < 60, (proc.returncode, output[-3000:])
    assert output.count("[r00] stopped after round") == 1 and "Traceback" not in output, output[-3000:]
    again = helpers.run_bounded([*helpers.python_run(), *args], env=THREE)
    assert again.returncode == 0 and "resuming" in again.output, again.report()
    assert main([*TINY, "--rounds", "4", "--reference", "--run-dir", str(ref)]) == 0
    assert _same(run_dir, ref)


def test_the_memory_floor_per_rank_counts_peft_for_the_lora_algorithms(monkeypatch):
    from sfprompt_mpi.world import PEFT_RANK_GB, RANK_MEMORY_FLOOR_GB, rank_floor_gb
    monkeypatch.delenv("SFPROMPT_RANK_GB", raising=False)
    assert rank_floor_gb("sfprompt") == RANK_MEMORY_FLOOR_GB
    assert rank_floor_gb("fedlora") == rank_floor_gb("legend") == RANK_MEMORY_FLOOR_GB + PEFT_RANK_GB
    # 51 ranks of fedlora do not fit where 51 of sfprompt do
    cfg = parse_config(["--algo", "fedlora", "--clients", "50", "--threads", "1"])
    assert launch.plan_ranks(cfg, 64, mem_gb=21.0, floor_gb=rank_floor_gb("sfprompt"))[0] == 51
    assert launch.plan_ranks(cfg, 64, mem_gb=21.0, floor_gb=rank_floor_gb("fedlora"))[0] == 43
    # the user's figure wins, whatever the algorithm
    monkeypatch.setenv("SFPROMPT_RANK_GB", "0")
    assert rank_floor_gb("fedlora") == 0.0
    monkeypatch.setenv("SFPROMPT_RANK_GB", "half")
    with pytest.raises(UserError, match="SFPROMPT_RANK_GB='half' must be a number of GB per rank"):
        rank_floor_gb("sfprompt")
