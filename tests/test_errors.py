"""Mistakes a user can make end with exit code 2, one line, and an untouched run directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sfprompt_mpi.config import build_config, load_toml
from sfprompt_mpi.errors import UserError
from sfprompt_mpi.run import main

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
    (["--algo", "fl-full"], "not implemented"),
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
