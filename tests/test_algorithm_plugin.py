"""A new algorithm is one module and one registry line: the worked example of docs/algorithms.md,
taken from the document itself, registered at test time and run end to end without any other edit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sfprompt_mpi import algorithms
from sfprompt_mpi.config import build_config
from sfprompt_mpi.cost import algorithm_costs
from sfprompt_mpi.metrics.h5 import read_metrics
from sfprompt_mpi.run import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"
FLAGS = ["--clients", "2", "--rounds", "2", "--max-train-samples", "80", "--max-test-samples", "40", "--threads", "1",
         "--batch-size", "16", "--seed", "3"]


@pytest.fixture
def half_epoch(tmp_path, monkeypatch) -> str:
    """docs/algorithms.md's example module, written out as ``labalgos.halfepoch`` and registered."""
    text = DOC.read_text()
    example = text[text.index("## A worked example"):]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    package = tmp_path / "labalgos"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "halfepoch.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(algorithms.REGISTRY, "half-epoch", "labalgos.halfepoch:HalfEpoch")
    return "half-epoch"


def test_the_documented_example_runs_as_a_registered_algorithm(half_epoch, tmp_path, capsys):
    assert main([*FLAGS, "--algo", half_epoch, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "plan: half-epoch" in plan and "whole model on every client" in plan

    run_dir = tmp_path / "run"
    assert main([*FLAGS, "--algo", half_epoch, "--run-dir", str(run_dir)]) == 0

    server = read_metrics(run_dir / "metrics" / "rank00000.h5")
    client = read_metrics(run_dir / "metrics" / "rank00001.h5")
    assert list(server["test_acc"][0]) == [1, 2]
    assert list(client["clients/0/kept"][1]) == [20, 20]  # half of its 40 samples, as the example says
    assert "clients/0/train_loss" in client


@pytest.mark.slow  # prices every registered algorithm (the LoRA ones build peft models)
def test_the_cost_accounting_prices_a_registered_algorithm(half_epoch):
    cfg = build_config({"data": {"max_train_samples": 80}})
    rows = algorithm_costs(cfg, 40, 10)
    assert half_epoch in rows
    full = rows["fl-full"]
    assert rows[half_epoch]["exchanged_params"] == full["exchanged_params"]
    assert rows[half_epoch]["client_flops_per_sample"] == pytest.approx(full["client_flops_per_sample"] / 2)
