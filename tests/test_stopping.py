"""Stopping to be continued: SIGTERM/SIGUSR1 to any rank, the time budget, and the same command continuing.

A stopped run finishes the round in progress, checkpoints it, flushes every
rank's HDF5 file and exits with 4 on every rank; the same command (same
``--run-dir``) continues it, and the end is bitwise that of an uninterrupted
run with every round once in every metrics file. The Slurm side (a wall-time
limit, ``scontrol requeue``) is in tests/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfprompt_mpi.config import parse_config
from sfprompt_mpi.errors import EXIT_CONTINUE
from sfprompt_mpi.metrics.h5 import read_events, read_metrics
from sfprompt_mpi.run import main
from sfprompt_mpi.stopping import STOP_MARGIN_S, Stopper

import run_helpers as helpers  # tests/mpi, put on sys.path by tests/conftest.py

COMMON = ["--clients", "4", "--max-train-samples", "240", "--max-test-samples", "100", "--threads", "1",
          "--batch-size", "16", "--seed", "3", "--server-batch", "1"]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "global.safetensors"))


def assert_continued_like_uninterrupted(run_dir: Path, whole: Path, rounds: int, ranks: int) -> None:
    """Bitwise the parameters of ``whole``; every round once in every rank's metrics file."""
    a, b = _params(run_dir), _params(whole)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run ({differ[:3]})"
    for rank in range(ranks):
        series = read_metrics(run_dir / "metrics" / f"rank{rank:05d}.h5")
        key = "test_acc" if rank == 0 else "bytes_sent/update"
        assert list(series[key][0]) == list(range(1, rounds + 1)), (rank, key, series[key][0])


# ------------------------------------------------------------------ the decision (pure)

def test_stopper_refuses_a_round_the_deadline_cannot_hold_and_any_round_after_a_request():
    # Prepare: a deadline 100 s away
    stopper = Stopper(deadline=time.monotonic() + 100)
    # Execute / Assert: no estimate yet -> go; 10 s rounds fit; 80 s rounds (x 1.25 + margin) do not
    assert stopper.stop_before(1, 0.0) is None
    assert stopper.stop_before(2, 10.0) is None
    assert "time budget" in stopper.stop_before(2, (100 - STOP_MARGIN_S) / 1.25 + 1)
    stopper.request("SIGTERM to rank 2")
    assert stopper.stop_before(2, 0.0) == "SIGTERM to rank 2"
    assert Stopper().stop_before(5, 1e9) is None  # no deadline, no request: never


def test_signal_sets_the_request_once_and_a_second_changes_nothing(capfd):
    stopper = Stopper().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # handlers run between bytecodes of the main thread
    finally:
        stopper.close()
    assert stopper.reason == "SIGUSR1 to rank 0"
    err = capfd.readouterr().err
    assert "SIGUSR1: the run stops after the round in progress" in err
    assert "SIGTERM: already stopping (SIGUSR1 to rank 0); it changes nothing" in err, err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# ------------------------------------------------------------ one process: budget and signal

@pytest.mark.slow
def test_time_budget_stops_after_a_complete_round_and_the_same_command_continues(tmp_path, capsys):
    # Prepare
    rounds, run_dir, whole = 3, tmp_path / "budget", tmp_path / "whole"
    cmd = COMMON + ["--rounds", str(rounds), "--run-dir", str(run_dir)]
    # Execute: a budget no second round fits in; then the same command without it
    assert main(cmd + ["--time-budget", "0.001"]) == EXIT_CONTINUE
    stopped_at = helpers.checkpoint_round(run_dir)
    line = capsys.readouterr().err.splitlines()[-1]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(cmd) == 0  # once more: a complete run has nothing to do (a requeued or repeated sweep task)
    again = capsys.readouterr().err
    assert main(COMMON + ["--rounds", str(rounds), "--run-dir", str(whole)]) == 0
    # Assert: stopped after round 1 with one line saying how it continues; ends like the uninterrupted run
    assert stopped_at == 1, stopped_at
    assert line.startswith("[r00] stopped after round 1 of 3 (time budget") and f"--run-dir {run_dir}" in line, line
    assert f"already completed {rounds} of {rounds} rounds; nothing to do" in again, again
    assert_continued_like_uninterrupted(run_dir, whole, rounds, ranks=2)
    events = read_events(run_dir / "metrics" / "rank00000.h5")
    assert [(r, k) for r, k, _ in events if k in ("stopped", "resume")] == [(1, "stopped"), (1, "resume")]


def test_run_dir_of_another_config_is_refused_with_one_line(tmp_path, capsys):
    # Prepare: a run directory holding a 3-round run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(parse_config(COMMON + ["--rounds", "3"]).to_toml())
    # Execute
    code = main(COMMON + ["--rounds", "4", "--run-dir", str(run_dir), "--dry-run"])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "holds a run of another config (fed.rounds is 3 there, 4 here)" in err and "--resume" in err, err


# ------------------------------------------------------------------------ under mpiexec

@pytest.mark.mpi
def test_sigterm_to_one_client_rank_stops_the_whole_job_cleanly_and_the_same_command_continues(tmp_path):
    rounds, run_dir, whole = 6, tmp_path / "stopped", tmp_path / "whole"
    args = [*COMMON, "--rounds", str(rounds), "--run-dir", str(run_dir)]
    # Round 2 takes at least 3 s (rank 1 sends its first activations late: --inject-fault slow sleeps
    # half of --client-timeout; no number changes), so the second signal surely comes during the stop
    slowed = [*args, "--client-timeout", "6", "--inject-fault", "slow@rank:1,round:2"]
    # Execute: once round 1 is checkpointed, SIGTERM client rank 2, and again a moment later
    proc = helpers.start_until_checkpoint(slowed, run_dir, 1)
    with helpers.reaped(proc):
        victim = helpers.rank_pid(proc.pid, 2)
        assert victim is not None and proc.poll() is None, "the job ended or never reached round 1"
        os.kill(victim, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(victim, signal.SIGTERM)
        ended_after, output = helpers.wait_for(proc, 90)
    stopped_at = helpers.checkpoint_round(run_dir)

    # Assert: the whole job stopped with 4, promptly, after a complete round, saying so once
    assert proc.returncode == EXIT_CONTINUE, (proc.returncode, output[-3000:])
    assert ended_after < 60 and 1 <= stopped_at < rounds, (ended_after, stopped_at, output[-3000:])
    assert "Traceback" not in output and output.count("[r00] stopped after round") == 1, output[-3000:]
    assert "SIGTERM to rank 2" in output and "[r02] SIGTERM: already stopping" in output, output[-3000:]
    # ... and the same command continues it to the end of an uninterrupted run
    resumed = helpers.launch(slowed, ranks=3, timeout=200)
    assert resumed.returncode == 0, resumed.report()
    assert f"resuming {run_dir} after round {stopped_at}" in resumed.output, resumed.report()
    assert main(COMMON + ["--rounds", str(rounds), "--run-dir", str(whole)]) == 0
    assert_continued_like_uninterrupted(run_dir, whole, rounds, ranks=3)


@pytest.mark.mpi
def test_a_stopped_job_exits_4_on_every_rank_though_each_is_signalled_on_its_way_out(tmp_path):
    # Prepare: a budget no second round fits in; every rank sends itself SIGTERM once its Stopper is
    # closed, as srun --kill-on-bad-exit does to the ranks still running once the first has exited 4
    args = [*COMMON, "--rounds", "3", "--run-dir", str(tmp_path / "run"), "--time-budget", "0.001"]
    # Execute
    job = helpers.launch(args, ranks=3, script=[helpers.__file__, "--signal-on-the-way-out"])
    # Assert: 4 from every rank (mpiexec reports the largest code; a rank killed by the signal makes it
    # 143 or 15), each saying that the signal changed nothing
    assert job.returncode == EXIT_CONTINUE, job.report()
    assert job.output.count("SIGTERM: already stopping (stopped after round 1)") == 3, job.report()


def test_an_explicit_resume_says_that_it_ignores_config(tmp_path, capsys):
    from sfprompt_mpi.run import resolve_config
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(parse_config(COMMON + ["--rounds", "3"]).to_toml())
    cfg = resolve_config(["--config", "configs/offline.toml", "--resume", str(run_dir)])
    assert cfg.fed.rounds == 3
    assert "warning: --config configs/offline.toml is ignored with --resume" in capsys.readouterr().err
