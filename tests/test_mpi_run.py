"""The whole job under a real ``mpiexec``: MPI run equals the reference run.

Every run here is ``python -m sfprompt_mpi.run`` exactly as a user starts it
(``mpiexec -n W`` from the venv's MPICH, or no launcher for the
single-process reference run), on the offline default (digits,
vit_micro_patch8_32), two rounds, one torch thread per rank. Runs are
launched once per module and shared between tests; every launch is bounded
and kills its process group on timeout (``tests/mpi/run_helpers.py``).

Final global parameters are compared through ``checkpoint/global.safetensors``:

- 3 ranks x 4 virtual clients equals the reference run bitwise (batching off);
- the gloo transport equals the MPI transport bitwise;
- server batching on (5 ranks, 4 clients, ``--server-batch 4``) stays within
  rtol 1e-5 of batching off, and the test checks that passes were batched;
- a client's wrong-shape activation is rejected with a clear line, the run
  completes, and the result equals the reference run without that client in
  that round, bitwise;
- a user error prints one ``error:`` line and exits 2; a crash on a client
  rank ends the whole job with its error, no hang.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfprompt_mpi.config import parse_config
from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.fed.state import Layout
from sfprompt_mpi.metrics.h5 import read_events, read_metrics
from sfprompt_mpi.model.split import build_model

import run_helpers as helpers  # tests/mpi, put on sys.path by tests/conftest.py

pytestmark = pytest.mark.mpi

COMMON = ["--clients", "4", "--rounds", "2", "--max-train-samples", "240", "--max-test-samples", "100",
          "--threads", "1", "--batch-size", "16", "--seed", "3", "--devices", "jetson"]
OFF = ["--server-batch", "1"]
DEFAULT_THREADS = [a for a in COMMON if a not in ("--threads", "1")]
DIGITS_CLASSES = 10
WRONG_SHAPE = "wrong-shape@rank:2,round:1"   # rank 2 hosts clients 2 and 3 of 4; client 2 is hit

# name -> (ranks or None for no launcher, flags, script or None for -m sfprompt_mpi.run)
RUNS = {
    "reference": (None, COMMON + OFF, None),
    "mpi": (3, COMMON + OFF, None),
    "gloo": (3, COMMON + OFF + ["--transport", "gloo"], None),
    "batched": (5, COMMON + ["--server-batch", "4"], None),
    "wrong_shape": (3, COMMON + OFF + ["--inject-fault", WRONG_SHAPE], None),
    "without_client2_round1": (None, COMMON + OFF, [str(Path(helpers.__file__)), "--without", "1:2"]),
    # the thread count left to the defaults, as a user first meets the contract
    "default_threads_reference": (None, DEFAULT_THREADS + OFF, None),
    "default_threads_mpi": (3, DEFAULT_THREADS + OFF, None),
}


class _Runs:
    """Each named run launched at most once per module, on first use."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.done: dict[str, tuple[Path, "helpers.Launch"]] = {}

    def get(self, name: str) -> tuple[Path, "helpers.Launch"]:
        if name not in self.done:
            ranks, flags, script = RUNS[name]
            run_dir = self.base / name
            result = helpers.launch([*flags, "--run-dir", str(run_dir)], ranks=ranks, script=script)
            assert result.returncode == 0, result.report()
            self.done[name] = (run_dir, result)
        return self.done[name]

    def params(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.get(name)[0] / "checkpoint" / "global.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory.mktemp("mpi_run"))


def _initial_params() -> dict[str, torch.Tensor]:
    cfg = parse_config(COMMON)
    model = build_model(cfg.model, DIGITS_CLASSES, cfg.run.seed, quiet=True)
    return Layout(model, build_algorithm(cfg).trained_names(model)).read(model)


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ (max abs diff {differ})"


def _series(run_dir: Path, key: str, rank: int = 0) -> np.ndarray:
    return read_metrics(run_dir / "metrics" / f"rank{rank:05d}.h5")[key][1]


# ------------------------------------------------------------ equal results


def test_mpi_run_equals_reference_run_bitwise(runs):
    reference, mpi = runs.params("reference"), runs.params("mpi")
    initial = _initial_params()

    _assert_bitwise(mpi, reference, "3 ranks x 4 clients vs the reference run")
    assert any(not torch.equal(reference[k], initial[k]) for k in initial), "training left the parameters unchanged"
    run_dir = runs.get("mpi")[0]
    assert all((run_dir / "metrics" / f"rank{r:05d}.h5").is_file() for r in range(3))
    np.testing.assert_array_equal(_series(run_dir, "test_acc"), _series(runs.get("reference")[0], "test_acc"))
    cpus = len(os.sched_getaffinity(0))
    policy = "nap after 1 ms" if 3 > cpus else "spin up to 200 ms"
    assert f"rank 0's node: 3 rank(s) on {cpus} CPU(s), 1 torch thread(s) each, waiting ranks {policy}" \
        in runs.get("mpi")[1].output


def test_simulated_times_do_not_depend_on_the_ranks_nor_on_server_batching(runs):
    """1 process, 3 ranks and 5 ranks with server batching: the same simulated clock, bitwise."""
    reference = read_metrics(runs.get("reference")[0] / "metrics" / "rank00000.h5")
    keys = sorted(k for k in reference if k.startswith("sim/"))
    assert "sim/round_s" in keys and "sim/client_server_s" in keys
    assert (reference["sim/round_s"][1] > 0).all()
    for name in ("mpi", "batched"):
        for key in keys:
            np.testing.assert_array_equal(_series(runs.get(name)[0], key), reference[key][1], err_msg=f"{name} {key}")


def test_default_threads_reference_equals_mpi_run_when_their_thread_counts_match(runs):
    """The contract's condition: equal torch threads per rank. By default the reference run takes what a rank
    of ``mpiexec -n clients+1`` gets on this node; 3 ranks get cpus // 3 each (at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    threads_reference, threads_mpi = max(1, cpus // 5), max(1, cpus // 3)

    reference, mpi = runs.params("default_threads_reference"), runs.params("default_threads_mpi")

    assert f"{threads_reference} torch thread(s) each" in runs.get("default_threads_reference")[1].output
    assert f"{threads_mpi} torch thread(s) each" in runs.get("default_threads_mpi")[1].output
    if threads_reference == threads_mpi:  # e.g. up to 5 CPUs: one thread each
        _assert_bitwise(mpi, reference, "default threads: 3 ranks vs the reference run")
    else:  # other splits of the same sums: close, not bitwise
        for name in reference:
            torch.testing.assert_close(mpi[name], reference[name], rtol=0, atol=1e-2, msg=lambda m: f"{name}: {m}")


def test_gloo_transport_equals_mpi_transport_bitwise(runs):
    gloo, mpi = runs.params("gloo"), runs.params("mpi")

    _assert_bitwise(gloo, mpi, "--transport gloo vs mpi")


def test_server_batching_matches_unbatched_within_1e_5(runs):
    batched, unbatched = runs.params("batched"), runs.params("reference")
    passes_on = _series(runs.get("batched")[0], "body_passes").sum()
    passes_off = _series(runs.get("reference")[0], "body_passes").sum()

    # Fewer body passes for the same samples: some pass held several clients' activations.
    assert passes_on < passes_off, f"no body pass was batched ({passes_on} vs {passes_off}); the test is vacuous"
    for name in unbatched:
        torch.testing.assert_close(batched[name], unbatched[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------- faults


def test_wrong_shape_activation_is_rejected_and_the_round_goes_on_without_it(runs):
    run_dir, result = runs.get("wrong_shape")
    faulty, without, full = runs.params("wrong_shape"), runs.params("without_client2_round1"), runs.params("reference")

    line = re.search(r"^\[r00\] round 1: rejected acts\(round=1, client=2, step=0, float32\[16x(\d+)x64\]\) "
                     r"from rank 2: expected shape \(B, (\d+), 64\)$", result.output, re.M)
    assert line is not None and int(line[1]) != int(line[2]), result.report()
    assert all(bool(torch.isfinite(t).all()) for t in faulty.values())
    _assert_bitwise(faulty, without, "wrong-shape run vs the reference run without client 2 in round 1")
    assert any(not torch.equal(faulty[k], full[k]) for k in full), "client 2's round 1 made no difference"
    events = read_events(run_dir / "metrics" / "rank00000.h5")
    assert [(rnd, kind) for rnd, kind, _ in events] == [(1, "rejected")]
    assert "expected shape (B, " in events[0][2]


@pytest.mark.parametrize("ranks,flags,needles", [
    (3, ["--clients", "1"], ["--clients 1", "2 client ranks"]),
    (2, ["--inject-fault", "crash@rank:99,round:1"], ["rank 99 is not a client rank of this run (1..1)"]),
])
def test_user_error_prints_one_line_once_and_exits_2(tmp_path, ranks, flags, needles):
    run_dir = tmp_path / "never"

    result = helpers.launch([*COMMON, *flags, "--run-dir", str(run_dir)], ranks=ranks)

    assert result.returncode == 2, result.report()
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), result.report()
    assert "Traceback" not in result.output, result.report()
    assert not run_dir.exists()


DRY_RUN_SCRIPT = """
import sys
from sfprompt_mpi.run import main
code = main(sys.argv[1:])
from mpi4py import MPI
print(f"RANK {MPI.COMM_WORLD.Get_rank()} imported torch: {'torch' in sys.modules}", flush=True)
sys.exit(code)
"""


def test_a_dry_runs_other_ranks_import_no_torch_and_end_with_rank_0s_checks(tmp_path):
    script = tmp_path / "dry_run.py"
    script.write_text(DRY_RUN_SCRIPT)

    valid = helpers.launch([*COMMON, "--dry-run"], ranks=3, script=[str(script)])
    refused = helpers.launch([*COMMON, "--dry-run", "--clients", "1"], ranks=3, script=[str(script)])

    assert valid.returncode == 0 and "dry run: config and world size are valid" in valid.output, valid.report()
    # (the ranks' lines may interleave within a line of the joined output: matched, not split)
    ranks = sorted(re.findall(r"RANK \d imported torch: (?:True|False)", valid.output))
    assert ranks == ["RANK 0 imported torch: True", "RANK 1 imported torch: False",
                     "RANK 2 imported torch: False"], valid.report()
    # rank 0's check fails: every rank ends with 2, one line, as in a run
    assert refused.returncode == 2, refused.report()
    assert refused.output.count("error: ") == 1 and "error: --clients 1 is smaller" in refused.output, refused.report()
    assert len(re.findall(r"RANK \d imported", refused.output)) == 3 and "Traceback" not in refused.output, \
        refused.report()


def test_too_many_ranks_for_the_node_memory_fail_fast_with_one_line(tmp_path):
    run_dir = tmp_path / "never"

    result = helpers.launch([*COMMON, "--run-dir", str(run_dir)], ranks=3, timeout=60,
                            env={"SFPROMPT_RANK_GB": "100000"})

    assert result.returncode == 2, result.report()
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "3 ranks on node" in errors[0] and "--clients" in errors[0], result.report()
    assert "Traceback" not in result.output and not run_dir.exists(), result.report()


def test_crash_on_a_client_rank_ends_the_whole_job(tmp_path):
    result = helpers.launch([*COMMON, "--run-dir", str(tmp_path / "crash"), "--inject-fault", "crash@rank:1,round:1"],
                            ranks=3, timeout=120)

    assert result.returncode != 0, result.report()
    assert "[r01] failed: RuntimeError: injected crash (--inject-fault)" in result.output, result.report()
    assert result.wall_s < 90, result.report()
