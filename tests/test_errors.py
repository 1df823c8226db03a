"""Mistakes a user can make end with exit code 2, one line, and an untouched run directory; every command
leaves its process the same way (``cli.end_process``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sfprompt_mpi.config import build_config, load_toml
from sfprompt_mpi.errors import UserError
from sfprompt_mpi.run import main

import run_helpers as helpers  # tests/mpi, put on sys.path by tests/conftest.py

TINY = ["--max-train-samples", "120", "--max-test-samples", "40", "--threads", "1", "--rounds", "1"]


def _fails_with_one_line(capsys, argv: list[str], needle: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "vit_nonexistent_9"], "unknown model"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--head-blocks", "3", "--tail-blocks", "3"], "head_blocks + tail_blocks"),
    (["--prompt-len", "-1"], "prompt_len must be >= 0"),
    (["--keep-ratio", "0"], "keep_ratio must be in (0, 1]"),
    (["--keep-ratio", "1.5"], "keep_ratio must be in (0, 1]"),
    (["--rounds", "many"], "invalid int value"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "pass --download"),
    (["--config", "/nonexistent.toml"], "does not exist"),
    # unknown flags and bad values of the fault, aggregation and privacy options
    (["--roundz", "3"], "unrecognized arguments: --roundz"),
    (["--client-timeout", "0"], "client_timeout must be > 0"),
    (["--min-clients", "0"], "min_clients must be >= 1"),
    (["--min-clients", "5"], "--min-clients 5 exceeds the 4 clients selected per round"),
    (["--clients", "4", "--fraction", "0.5", "--min-clients", "3"], "exceeds the 2 clients selected"),
    (["--round-retries", "-1"], "round_retries must be >= 0"),
    (["--aggregator", "mean"], "invalid choice: 'mean'"),
    (["--trim-fraction", "0.5"], "trim_fraction must be in [0, 0.5)"),
    (["--clip-norm", "-1"], "clip_norm must be a finite number >= 0"),
    (["--dp-noise", "1.0"], "dp_noise needs fed.dp_clip > 0"),
    (["--dp-clip", "1.0", "--aggregator", "median"], "drop --aggregator median or --dp-clip"),
    (["--dp-delta", "1.5"], "dp_delta must be in (0, 1)"),
    (["--inject-fault", "hang@rank:1"], "must look like KIND@rank:R,round:K"),
    (["--inject-fault", "melt@rank:1,round:1"], "kind 'melt' is not one of"),
    (["--inject-fault", "crash@rank:2,round:1"], "rank 2 is not a client rank of this run (1..1)"),
    (["--inject-fault", "crash@rank:1,round:11"], "round 11 is not a round of this run (1..10)"),
    (["--inject-fault", "crash@rank:1,round:0"], "round 0 is not a round of this run (1..10)"),
    # seeds: numpy's SeedSequence wants >= 0, TOML and torch 64 bits
    (["--seed", "-1"], "run.seed must be in [0, 2**63 - 1]"),
    (["--seed", str(2**63)], "run.seed must be in [0, 2**63 - 1]"),
    (["--seed", str(2**64)], "run.seed must be in [0, 2**63 - 1]"),
    # a transport between ranks in a one-process run
    (["--transport", "gloo"], "--transport gloo carries tensors between MPI ranks but this run has one process"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv: list[str], needle: str) -> None:
    run_dir = tmp_path / "run"
    _fails_with_one_line(capsys, argv + ["--run-dir", str(run_dir)], needle)
    assert not run_dir.exists()


def test_config_file_typos_and_wrong_types_name_the_key(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fed]\nrounds = 3\nroundz = 4\n")
    with pytest.raises(UserError, match="fed.roundz"):
        load_toml(bad)
    bad.write_text("[fed]\nrounds = \"three\"\n")
    with pytest.raises(UserError, match="fed.rounds must be int"):
        load_toml(bad)
    bad.write_text("[fedd]\nrounds = 3\n")
    with pytest.raises(UserError, match=r"\[fedd\]"):
        load_toml(bad)
    with pytest.raises(UserError, match="fraction"):
        build_config({"fed": {"fraction": 0.0}})


def test_existing_run_directory_is_never_overwritten(capsys, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("precious")
    _fails_with_one_line(capsys, TINY + ["--run-dir", str(run_dir)], "already exists")
    assert (run_dir / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_corrupt_or_foreign_checkpoint_is_refused_and_left_alone(capsys, tmp_path) -> None:
    # Prepare: a finished 1-round run
    run_dir = tmp_path / "run"
    assert main(TINY + ["--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    tensors = run_dir / "checkpoint" / "global.safetensors"
    original = tensors.read_bytes()
    # Execute / Assert: flipped bytes are caught by the checksum
    tensors.write_bytes(original[:-8] + b"\x00" * 8)
    _fails_with_one_line(capsys, ["--resume", str(run_dir), "--rounds", "2"], "corrupt")
    assert tensors.read_bytes() == original[:-8] + b"\x00" * 8
    # A checkpoint of another config (different prompt length) is refused by name.
    tensors.write_bytes(original)
    _fails_with_one_line(capsys, ["--resume", str(run_dir), "--rounds", "2", "--prompt-len", "3"],
                         "different config")
    # Not a run directory at all
    _fails_with_one_line(capsys, ["--resume", str(tmp_path)], "not a run directory")


def test_the_real_cli_prints_one_line_and_exits_2(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sfprompt_mpi.run", "--keep-ratio", "2", "--run-dir",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: fed.keep_ratio must be in (0, 1], got 2.0"]


def test_config_file_mistakes_exit_2_naming_the_key(capsys, tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    for text, needle in [("[fed]\nroundz = 4\n", "unknown config key fed.roundz"),
                         ('[fed]\nrounds = "three"\n', "fed.rounds must be int, got str"),
                         ("[comm]\nmin_clients = 1.5\n", "comm.min_clients must be int, got float"),
                         ('[fed]\naggregator = "krum"\n', "fed.aggregator must be one of"),
                         ("[fedd]\nrounds = 3\n", "unknown config section [fedd]"),
                         ("[fed\nrounds = 3\n", "is not valid TOML")]:
        bad.write_text(text)
        run_dir = tmp_path / "never"
        _fails_with_one_line(capsys, ["--config", str(bad), "--run-dir", str(run_dir)], needle)
        assert not run_dir.exists()


def test_unwritable_run_directory_exits_2(capsys, tmp_path) -> None:
    # A file where a directory must go: unwritable even for root, whom os.access waves through.
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    _fails_with_one_line(capsys, TINY + ["--run-dir", str(blocker / "run")], "cannot be created")
    assert blocker.read_text() == "not a directory"
    if os.geteuid() != 0:  # root may write into a mode-500 directory; the case above covers root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            _fails_with_one_line(capsys, TINY + ["--run-dir", str(ro / "run")], "is not writable")
        finally:
            ro.chmod(0o700)
        assert list(ro.iterdir()) == []


def test_unreadable_or_missing_checkpoint_is_refused(capsys, tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert main(TINY + ["--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    (run_dir / "checkpoint" / "state.json").write_text('{"round": 1, "sha')  # torn JSON
    _fails_with_one_line(capsys, ["--resume", str(run_dir), "--rounds", "2"], "corrupt")
    (run_dir / "checkpoint" / "global.safetensors").unlink()
    _fails_with_one_line(capsys, ["--resume", str(run_dir), "--rounds", "2"], "no checkpoint")


def test_main_guard_turns_user_errors_and_stops_into_exit_codes(capsys):
    from sfprompt_mpi.cli import Where, main_guard
    from sfprompt_mpi.errors import RunStopped

    def fails(exc):
        def work(argv):
            raise exc
        return work

    assert main_guard(lambda argv: 0, []) == 0
    assert main_guard(fails(UserError("bad --x")), []) == 2
    assert capsys.readouterr().err == "error: bad --x\n"
    assert main_guard(fails(UserError("bad --x")), [], Where(rank=1)) == 2
    assert capsys.readouterr().err == ""  # only rank 0 speaks
    assert main_guard(fails(RunStopped("2 of 4 clients left")), [], Where(rank=0)) == 3
    assert capsys.readouterr().err == "[r00] stopped: 2 of 4 clients left\n"
    assert main_guard(fails(KeyboardInterrupt()), [], Where(interrupts=True)) == 130
    with pytest.raises(KeyboardInterrupt):
        main_guard(fails(KeyboardInterrupt()), [])
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback outside MPI
        main_guard(fails(ZeroDivisionError()), [])


def test_missing_cuda_is_refused_before_anything_is_written_or_started(capsys, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_dir = tmp_path / "run"

    code = main(TINY + ["--server-device", "cuda", "--run-dir", str(run_dir)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "no CUDA device" in err[0], err
    assert not run_dir.exists()


@pytest.mark.slow
def test_pretrained_weights_neither_cached_nor_reachable_fail_in_seconds_even_for_a_dry_run(tmp_path):
    # Prepare: an empty Hugging Face cache and a hub that refuses connections (a node without internet)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://127.0.0.1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sfprompt_mpi.run", "--dry-run", "--server-device", "cpu", "--pretrained",
           "--model", "vit_tiny_patch16_224.augreg_in21k"]
    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    # Assert: one line naming the cache and the unreachable hub, exit 2, not minutes of retries
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "neither cached" in lines[0] and "127.0.0.1" in lines[0] and "--checkpoint" in lines[0], lines[0]


def test_advice_on_the_number_of_ranks_fits_the_launcher(monkeypatch):
    from sfprompt_mpi.runtime import _ranks_flag
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert _ranks_flag(5).startswith("sbatch --ntasks=5")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert _ranks_flag(5) == "mpiexec -n 5"


def test_a_server_without_the_gpus_slurm_allocated_says_it_runs_on_the_cpu(tmp_path, capsys, monkeypatch):
    # --server-device auto falls back to the CPU without a word unless told: with GPUs allocated it warns.
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    flags = ["--clients", "2", "--rounds", "1", "--max-train-samples", "40", "--max-test-samples", "20",
             "--threads", "1", "--no-pretrained", "--run-dir", str(tmp_path / "run")]
    assert main(flags) == 0
    err = capsys.readouterr().err
    assert "the server's body runs on the CPU: no CUDA device is usable on rank 0 although Slurm allocated GPU(s) 0" in err


_ENDING = """
import atexit, sys, threading, time
from sfprompt_mpi.cli import end_process

class Teardown:
    def __del__(self):
        sys.stderr.write("torn down\\n")

KEPT = Teardown()  # freed only by the interpreter's teardown
atexit.register(lambda: sys.stderr.write("exit handler ran\\n"))
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), sys.stderr.write("thread ended\\n"))).start()
sys.stdout.write("no newline, still buffered")
end_process(7)
"""


@pytest.mark.parametrize("case", ["alone", "thread"])
def test_end_process_keeps_the_exit_code_the_output_and_the_exit_handlers(case):
    # Execute: a command's last step, with its stdout a pipe (block-buffered)
    done = subprocess.run([sys.executable, "-c", _ENDING, case], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(helpers.ROOT)})
    # Assert: the code, the buffered output and the exit handlers survive; the teardown is skipped
    # unless a thread still runs, whose end it then waits for
    assert done.returncode == 7, done.stderr
    assert done.stdout == "no newline, still buffered"
    assert "exit handler ran" in done.stderr
    assert ("torn down" in done.stderr) == (case == "thread"), done.stderr
    assert ("thread ended" in done.stderr) == (case == "thread"), done.stderr


_RANK_ENDING = """
import sys
from mpi4py import MPI
from sfprompt_mpi.cli import end_process
MPI.COMM_WORLD.allgather(None)
end_process(int(sys.argv[1]))
"""


@pytest.mark.mpi
def test_end_process_on_ranks_of_mpiexec_keeps_every_ranks_exit_code():
    # Execute: every rank ends with 2 (as after a user error all ranks agreed on) or 0; os._exit after
    # MPI_Finalize made mpiexec report some of them as killed (9) in about half of the jobs ending with
    # 2 and now and then of those ending with 0
    codes = [helpers.run_bounded([str(helpers.MPIEXEC), "-n", "3", sys.executable, "-c", _RANK_ENDING, str(code)],
                                 60).returncode for code in (2, 0) * 5]
    # Assert
    assert codes == [2, 0] * 5
