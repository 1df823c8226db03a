"""Byte accounting against real runs: what the transports counted is conserved
between server and clients, and equals the estimate from the config alone.

Each case runs a real tiny job (single-process reference run, or 3 ranks under
``mpiexec``), then recomputes the round's bytes with
:func:`sfprompt_mpi.estimate.round_bytes` from the run's saved config,
the real shard sizes (same partition function and labels as the run), the
hosts mapping and the clients selected in each round. Estimate and
measurement must agree exactly, per round and per message kind.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest

from sfprompt_mpi.config import config_from_dict, load_toml
from sfprompt_mpi.data.datasets import build_data
from sfprompt_mpi.data.partition import partition_indices
from sfprompt_mpi.fed.state import select_clients
from sfprompt_mpi.estimate import build_meta_model, client_round_bytes, needs_grad, round_bytes
from sfprompt_mpi.metrics.h5 import rank_file, read_metrics
from sfprompt_mpi.model.vit import model_depth_and_size
from sfprompt_mpi.world import client_hosts
from run_helpers import run_bounded  # tests/mpi, on sys.path via tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
LAUNCH_TIMEOUT_S = 180
ROUNDS = 2
TINY = ["--rounds", str(ROUNDS), "--max-train-samples", "200", "--max-test-samples", "60", "--threads", "1",
        "--batch-size", "16"]
GRAD_KINDS = {"grad_out", "grad_acts"}


def _launch(run_dir: Path, flags: list[str], world: int) -> None:
    """Run the job to completion: in this process for one, else bounded (its whole process group dies on timeout)."""
    args = ["--run-dir", str(run_dir), *TINY, *flags]
    if world == 1:
        from sfprompt_mpi.run import main
        assert main(args) == 0
        return
    job = [str(MPIEXEC), "-n", str(world), sys.executable, "-m", "mpi4py", "-m", "sfprompt_mpi.run", *args]
    result = run_bounded(job, LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.output


def _measured(run_dir: Path, rank: int) -> dict[str, dict[int, dict[str, int]]]:
    """{'sent'|'recv': {round: {kind: bytes}}} as ``rank`` logged them."""
    out: dict[str, dict[int, dict[str, int]]] = {"sent": defaultdict(dict), "recv": defaultdict(dict)}
    for key, (steps, values) in read_metrics(rank_file(run_dir, rank)).items():
        if key.startswith(("bytes_sent/", "bytes_recv/")):
            way, kind = key.removeprefix("bytes_").split("/")
            for step, value in zip(steps.tolist(), values.tolist()):
                out[way][step][kind] = int(value)
    return out


def _expected(run_dir: Path, world: int) -> dict[int, dict[str, dict[str, int]]]:
    """{round: {'up'|'down': {kind: bytes}}} from the run's config, data and selection alone."""
    cfg = config_from_dict(load_toml(run_dir / "config.toml"))
    n = cfg.fed.clients or (4 if world == 1 else world - 1)
    hosts = {1: list(range(n))} if world == 1 else client_hosts(n, world)
    data = build_data(cfg.data, model_depth_and_size(cfg.model.name)[1], cfg.run.seed)
    parts = partition_indices(data.train_labels, n, cfg.data.partition, alpha=cfg.data.alpha,
                              shards_per_client=cfg.data.shards_per_client, seed=cfg.run.seed)
    shards = {c: len(p) for c, p in enumerate(parts)}
    model, layout = build_meta_model(cfg, data.num_classes)
    return {rnd: round_bytes(shards, hosts, select_clients(n, cfg.fed.fraction, cfg.run.seed, rnd), cfg,
                             tokens=model.tokens, width=model.width, flat=layout.numel, need_grad=needs_grad(model, layout))
            for rnd in range(1, cfg.fed.rounds + 1)}


CASES = {
    "single": (1, []),
    "single-no-pruning-uneven-shards": (1, ["--keep-ratio", "1.0", "--clients", "3"]),
    "single-no-prompts": (1, ["--prompt-len", "0"]),
    "mpi3-half-selected-bf16": (3, ["--clients", "4", "--fraction", "0.5", "--wire-dtype", "bfloat16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.mpi) if CASES[c][0] > 1 else c for c in CASES])
def test_measured_bytes_are_conserved_and_equal_the_estimate(case, tmp_path):
    world, flags = CASES[case]
    if world > 1 and not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    run_dir = tmp_path / "run"

    _launch(run_dir, flags, world)
    server = _measured(run_dir, 0)
    clients = [_measured(run_dir, rank) for rank in range(1, max(world, 2))]
    expected = _expected(run_dir, world)

    assert sorted(server["sent"]) == sorted(server["recv"]) == list(range(1, ROUNDS + 1))
    for rnd in range(1, ROUNDS + 1):
        # (a) conservation: every byte the server received some client sent, and vice versa
        for here, there in (("recv", "sent"), ("sent", "recv")):
            summed: dict[str, int] = defaultdict(int)
            for c in clients:
                for kind, n in c[there][rnd].items():
                    summed[kind] += n
            assert server[here][rnd] == dict(summed), f"round {rnd}: server {here} != clients {there}"
        # (b) the estimate from the config alone, exactly, per kind
        assert server["recv"][rnd] == expected[rnd]["up"], f"round {rnd} up"
        assert server["sent"][rnd] == expected[rnd]["down"], f"round {rnd} down"
    kinds = set(server["sent"][1]) | set(server["recv"][1])
    assert (GRAD_KINDS & kinds) == (set() if "--prompt-len" in flags else GRAD_KINDS)


def test_client_round_bytes_counts_every_message_of_a_round():
    # Prepare: 10 samples, keep 0.5 -> 5 kept, batch 2 -> batches 2, 2, 1 per epoch, 2 epochs
    cfg = config_from_dict({"fed": {"keep_ratio": 0.5, "batch_size": 2, "split_epochs": 2},
                            "comm": {"wire_dtype": "bfloat16"}})
    header = 120  # HEADER_BYTES

    # Execute
    got = client_round_bytes(10, cfg, tokens=3, width=4, flat=7, need_grad=True)

    # Assert: 6 batch messages of each activation kind, 2 bytes per element on the wire
    act = 2 * (header + 2 * 3 * 4 * 2) * 2 + 2 * (header + 1 * 3 * 4 * 2)
    vec = header + 7 * 4
    assert got == {"up": {"acts": act, "grad_out": act, "update": vec},
                   "down": {"body_out": act, "grad_acts": act, "params": vec}}
    no_grad = client_round_bytes(10, cfg, tokens=3, width=4, flat=7, need_grad=False)
    assert no_grad == {"up": {"acts": act, "update": vec}, "down": {"body_out": act, "params": vec}}


def test_client_round_bytes_without_split_training_has_no_activation_kinds():
    cfg = config_from_dict({"fed": {"split_epochs": 0}})

    got = client_round_bytes(10, cfg, tokens=3, width=4, flat=7, need_grad=True)

    assert got == {"up": {"update": 120 + 28}, "down": {"params": 120 + 28}}
