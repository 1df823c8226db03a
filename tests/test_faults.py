"""Faults: stragglers and dropouts, retries, kill -9 and resume, malformed and
poisoned updates, robust aggregation, client-level differential privacy.

Runs that involve ranks are real ``mpiexec -n 3`` jobs of
``python -m sfprompt_mpi.run`` (rank 0 server, ranks 1 and 2 hosting clients
0-1 and 2-3), launched through ``tests/mpi/run_helpers.py`` and bounded; a
fault is provoked with ``--inject-fault``. Runs that only exercise the
server's aggregation use the single-process reference run, which runs the
same server code over the in-process transport.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfprompt_mpi.comm.loopback import LoopbackHub
from sfprompt_mpi.comm.protocol import Header, Kind, Message, pack_header, unpack_header
from sfprompt_mpi.config import build_config
from sfprompt_mpi.fed.aggregate import Updates, aggregate, fedavg, fedavg_flat, median, norm_clip, trimmed_mean
from sfprompt_mpi.fed.dp import dp_epsilon, dp_fedavg
from sfprompt_mpi.fed.checks import Late, check_message
from sfprompt_mpi.fed.server import Server
from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.fed.state import Layout
from sfprompt_mpi.metrics.h5 import read_events, read_metrics
from sfprompt_mpi.model.split import build_model
from sfprompt_mpi.run import main

import run_helpers as helpers  # tests/mpi, put on sys.path by tests/conftest.py

COMMON = ["--clients", "4", "--max-train-samples", "240", "--max-test-samples", "100", "--threads", "1",
          "--batch-size", "16", "--seed", "3", "--server-batch", "1"]


def _server_file(run_dir: Path) -> Path:
    return run_dir / "metrics" / "rank00000.h5"


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "global.safetensors"))


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ ({differ[:3]})"


# ------------------------------------------------------------- aggregators (pure)


def _vectors(k: int = 5, f: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(f, generator=g) for _ in range(k)]


def test_robust_aggregators_equal_their_definitions():
    vs = _vectors(5)
    stacked = torch.stack([v.double() for v in vs])

    torch.testing.assert_close(median(vs), stacked.median(dim=0).values.float(), rtol=0, atol=0)
    even = vs[:4]
    s4 = torch.stack([v.double() for v in even]).sort(dim=0).values
    torch.testing.assert_close(median(even), ((s4[1] + s4[2]) / 2).float(), rtol=0, atol=0)
    # trim 0.2 of 5 drops one value at each end of every coordinate
    want = stacked.sort(dim=0).values[1:4].mean(dim=0).float()
    torch.testing.assert_close(trimmed_mean(vs, 0.2), want, rtol=0, atol=0)
    assert torch.equal(trimmed_mean(vs, 0.0), stacked.mean(dim=0).float())
    # fedavg on flat vectors is bitwise the state-dict fedavg
    weights = [3, 1, 4, 1, 5]
    assert torch.equal(fedavg_flat(list(zip(vs, weights))), fedavg([({"x": v}, w) for v, w in zip(vs, weights)])["x"])


def test_norm_clip_bounds_what_one_client_can_move():
    g = torch.zeros(4)
    honest = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0, 1.0, 0])]
    liar = torch.tensor([0, 0, 0, 1e9])
    updates = [(u, 1.0) for u in honest + [liar]]

    out, bound = norm_clip(g, updates, bound=0.5)
    auto, auto_bound = norm_clip(g, updates)

    assert bound == 0.5
    torch.testing.assert_close(out, torch.tensor([0.125, 0.125, 0.125, 0.125]))
    assert auto_bound == 1.0  # median of the delta norms (1, 1, 1, 1e9)
    torch.testing.assert_close(auto, torch.tensor([0.25, 0.25, 0.25, 0.25]))
    assert float(fedavg_flat(updates).abs().max()) == pytest.approx(2.5e8)
    new, stats = aggregate("norm-clip", g, updates, clip=0.5)
    assert torch.equal(new, out) and stats == {"clip_bound": 0.5}


def test_aggregation_follows_the_order_given_not_arrival():
    vs = _vectors(6, f=1000, seed=1)
    ws = [1, 2, 3, 4, 5, 6]
    for name in ("fedavg", "median", "trimmed-mean", "norm-clip"):
        a, _ = aggregate(name, torch.zeros(1000), list(zip(vs, ws)))
        b, _ = aggregate(name, torch.zeros(1000), list(zip(vs, ws)))
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate("mean-ish", torch.zeros(2), [(torch.zeros(2), 1)])


# ------------------------------------------------------------------ DP (pure)


def test_dp_fedavg_clips_averages_over_k_and_adds_seeded_noise():
    g = torch.zeros(50_000)
    updates = [torch.full((50_000,), 0.01), torch.full((50_000,), 100.0)]  # norms ~2.2 and ~22000

    quiet, stats = dp_fedavg(g, updates, clip=1.0, noise=0.0, selected=4, seed=0, rnd=1)
    noisy, _ = dp_fedavg(g, updates, clip=1.0, noise=2.0, selected=4, seed=0, rnd=1)
    again, _ = dp_fedavg(g, updates, clip=1.0, noise=2.0, selected=4, seed=0, rnd=1)
    other, _ = dp_fedavg(g, updates, clip=1.0, noise=2.0, selected=4, seed=0, rnd=2)

    # both clipped to norm 1, summed, divided by K = 4 selected (not 2 survivors)
    assert float(torch.linalg.vector_norm(quiet.double())) == pytest.approx(0.5, rel=1e-6)
    assert stats["dp_clipped_frac"] == 1.0 and stats["dp_sigma"] == 0.0
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    assert float((noisy - quiet).double().std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.02)


@pytest.mark.slow
def test_dp_epsilon_is_opacus_rdp_accountant_stepped_per_round():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for r in range(1, 6):
        acc.step(noise_multiplier=1.3, sample_rate=0.25)
        assert dp_epsilon(r, noise=1.3, sample_rate=0.25, delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert dp_epsilon(3, noise=0.0, sample_rate=0.5, delta=1e-5) == math.inf
    assert dp_epsilon(0, noise=1.0, sample_rate=0.5, delta=1e-5) == 0.0


@pytest.mark.slow
def test_dp_run_records_epsilon_per_round_and_resumes_to_the_same_parameters(tmp_path):
    flags = COMMON + ["--dp-clip", "0.5", "--dp-noise", "1.0", "--fraction", "0.5", "--dp-delta", "1e-4"]
    whole, part = tmp_path / "whole", tmp_path / "part"

    assert main(flags + ["--rounds", "3", "--run-dir", str(whole)]) == 0
    assert main(flags + ["--rounds", "2", "--run-dir", str(part)]) == 0
    assert main(["--resume", str(part), "--rounds", "3"]) == 0

    for run_dir in (whole, part):
        steps, eps = read_metrics(_server_file(run_dir))["dp_epsilon"]
        assert list(steps) == [1, 2, 3]
        want = [dp_epsilon(r, noise=1.0, sample_rate=0.5, delta=1e-4) for r in (1, 2, 3)]
        np.testing.assert_allclose(eps, want)
        assert eps[0] < eps[1] < eps[2]
    _assert_bitwise(_params(part), _params(whole), "DP run resumed after round 2 vs uninterrupted")


# ------------------------------------------------ the server's checks (unit)


@pytest.fixture(scope="module")
def server() -> Server:
    cfg = build_config({"fed": {"clients": 4, "batch_size": 16}})
    model = build_model(cfg.model, 10, cfg.run.seed, quiet=True)
    layout = Layout(model, build_algorithm(cfg).trained_names(model))
    hub = LoopbackHub(3)
    return Server(cfg, model, layout, [], {1: [0, 1], 2: [2, 3]}, hub.endpoint(0))


def _msg(source: int, kind: Kind, payload: torch.Tensor | None, *, round: int = 5, client: int = 0,
         step: int = 0, aux: int = 1) -> Message:
    shape = None if payload is None else tuple(payload.shape)
    dtype = torch.float32 if payload is None else payload.dtype
    return Message(source, Header(kind, round, client, step, dtype, shape, aux), payload)


def _server_with(hub: LoopbackHub, fed: dict) -> Server:
    cfg = build_config({"fed": {"clients": 4, "batch_size": 16, **fed}})
    model = build_model(cfg.model, 10, cfg.run.seed, quiet=True)
    return Server(cfg, model, Layout(model, build_algorithm(cfg).trained_names(model)), [], {1: [0, 1], 2: [2, 3]},
                  hub.endpoint(0))


@pytest.mark.parametrize("fed, streams", [({}, True), ({"aggregator": "median"}, False),
                                          ({"dp_clip": 1.0}, False)])
def test_fedavg_updates_are_summed_on_arrival_whatever_the_order(fed, streams):
    g = torch.Generator().manual_seed(3)
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        hub = LoopbackHub(3)
        srv = _server_with(hub, fed)
        f = srv.layout.numel
        if not results:
            vectors = [torch.randn(f, generator=g) * 10.0 ** (c - 2) for c in range(4)]
        for c in order:  # the hosts' updates arrive in this order
            host = 1 if c < 2 else 2
            hub.endpoint(host).send(0, Kind.UPDATE, vectors[c], round=5, client=c, aux=10 + c)
        updates = srv.service.serve(srv.expected(5, 0, [0, 1, 2, 3]), Updates(f, srv.algorithm.streams())).updates
        assert updates.ids() == [0, 1, 2, 3] and len(updates.vectors) == (0 if streams else 4)
        new_F, _ = srv.algorithm.aggregate(5, vectors[0], updates, selected=4, num_clients=4)
        results.append(new_F)
    assert all(torch.equal(r, results[0]) for r in results)
    if streams:
        assert torch.equal(results[0], fedavg_flat([(v, 10 + c) for c, v in enumerate(vectors)]))


def test_server_refuses_every_malformed_message_with_a_reason(server):
    n, d, f = server.model.tokens, server.model.width, server.layout.numel
    good = torch.zeros(4, n, d)
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    active = {0, 1, 2}  # client 3 left this round already
    bad = [
        (_msg(1, Kind.PARAMS, torch.zeros(f)), "unexpected message kind params"),
        (_msg(1, Kind.ACTS, good, round=6), "message for round 6 during round 5"),
        (_msg(2, Kind.ACTS, good, client=0), "not a client of rank 2"),
        (_msg(1, Kind.ACTS, torch.zeros(4, n - 1, d)), f"expected shape (B, {n}, {d})"),
        (_msg(1, Kind.ACTS, torch.zeros(17, n, d)), "exceeds --batch-size 16"),
        (_msg(1, Kind.ACTS, good.double()), "dtype"),
        (_msg(1, Kind.ACTS, nan), "NaN or Inf"),
        (_msg(1, Kind.UPDATE, torch.zeros(f + 1), aux=10), "shape"),
        (_msg(1, Kind.UPDATE, torch.zeros(f), aux=0), "sample count 0"),
        (_msg(1, Kind.UPDATE, torch.zeros(f), aux=2**31), f"sample count {2**31} (must be 1..{2**31 - 1})"),
        (_msg(1, Kind.UPDATE, torch.full((f,), float("inf")), aux=10), "NaN or Inf"),
        (_msg(1, Kind.GRAD_OUT, good, step=3), "no body output awaiting it"),
        (_msg(1, Kind.GRAD_OUT, torch.zeros(2, n, d), step=0), "gradient shape differs"),
    ]
    awaiting = {(0, 0): tuple(good.shape)}.get  # step 0 of client 0 awaits its gradient
    want = server.expected(5, 0, [0, 1, 2, 3])
    for msg, reason in bad:
        with pytest.raises(Exception) as info:
            check_message(msg, want, active, lambda c, s: awaiting((c, s)))
        assert not isinstance(info.value, Late), (msg.header.describe(), info.value)
        assert reason in str(info.value), (msg.header.describe(), str(info.value))
    # a straggler's message: earlier round, earlier attempt, or a client that already left
    for msg in (_msg(1, Kind.ACTS, good, round=4), _msg(2, Kind.UPDATE, torch.zeros(f), client=3)):
        with pytest.raises(Late):
            check_message(msg, want, active, lambda c, s: awaiting((c, s)))
    with pytest.raises(Late, match="late message of round 5"):
        check_message(_msg(1, Kind.ACTS, good, round=5), server.expected(5, 1, [0, 1, 2, 3]), active,
                      lambda c, s: awaiting((c, s)))
    assert check_message(_msg(1, Kind.ACTS, good), want, active, lambda c, s: awaiting((c, s))) == Kind.ACTS
    assert check_message(_msg(1, Kind.GRAD_OUT, good), want, active, lambda c, s: awaiting((c, s))) == Kind.GRAD_OUT
    retry = unpack_header(pack_header(Header(Kind.ACTS, 5, attempt=2)))
    assert (retry.round, retry.attempt) == (5, 2) and Header(Kind.ACTS, 5).attempt == 0


# ------------------------------------------------ poisoned updates (reference run)


@pytest.mark.slow
def test_huge_norm_client_wrecks_fedavg_but_not_norm_clip_or_median(tmp_path):
    # Prepare: 4 clean rounds once; then round 5 four ways from the same checkpoint.
    clean = tmp_path / "clean"
    flags = ["--clients", "4", "--max-train-samples", "800", "--max-test-samples", "200", "--threads", "1",
             "--batch-size", "16", "--keep-ratio", "1.0", "--server-batch", "1"]
    assert main(flags + ["--rounds", "4", "--run-dir", str(clean)]) == 0
    acc = {}
    for name, extra in [("clean", []), ("fedavg", []), ("norm-clip", ["--aggregator", "norm-clip"]),
                        ("median", ["--aggregator", "median"])]:
        run_dir = tmp_path / f"round5-{name}"
        shutil.copytree(clean, run_dir)
        fault = [] if name == "clean" else ["--inject-fault", "huge-norm@rank:1,round:5"]
        # Execute: client 0 (the first of the host) uploads global + 1e6 x its delta in round 5
        assert main(["--resume", str(run_dir), "--rounds", "5", *extra, *fault]) == 0
        acc[name] = float(read_metrics(_server_file(run_dir))["test_acc"][1][-1])
    before = float(read_metrics(_server_file(clean))["test_acc"][1][-1])

    # Assert: chance is 0.1
    assert before >= 0.35 and acc["clean"] >= 0.35, (before, acc)
    assert acc["fedavg"] <= 0.2, acc
    assert acc["norm-clip"] >= acc["clean"] - 0.1, acc
    assert acc["median"] >= acc["clean"] - 0.1, acc


# --------------------------------------------------------- stragglers (mpiexec)


@pytest.mark.mpi
def test_hung_client_rank_is_dropped_late_messages_discarded_and_the_run_completes(tmp_path):
    run_dir = tmp_path / "hang"

    # rank 2 sleeps 9 s in round 1: dropped from rounds 1 and 2, back by round 4 at the latest
    result = helpers.launch([*COMMON, "--rounds", "4", "--client-timeout", "3",
                             "--inject-fault", "hang@rank:2,round:1", "--run-dir", str(run_dir)], ranks=3, timeout=150)

    assert result.returncode == 0, result.report()
    assert re.search(r"^\[r00\] round 1: dropped client\(s\) \[2, 3\]: rank 2 sent nothing for 3 s "
                     r"\(--client-timeout\)$", result.output, re.M), result.report()
    events = read_events(_server_file(run_dir))
    dropped = [(r, text) for r, kind, text in events if kind == "dropped"]
    assert dropped[:2] == [(1, "client 2: rank 2 sent nothing for 3 s (--client-timeout)"),
                           (1, "client 3: rank 2 sent nothing for 3 s (--client-timeout)")], events
    # The hung rank (asleep 9 s) sends its round-1 activations late: recognised by round and discarded.
    late = [(r, text) for r, kind, text in events if kind == "late"]
    assert late and all("late message of round 1" in t or "late message of round 2" in t for _, t in late), events
    metrics = read_metrics(_server_file(run_dir))
    assert list(metrics["test_acc"][0]) == [1, 2, 3, 4]
    assert list(metrics["clients_dropped"][1][:2]) == [2.0, 2.0]
    assert metrics["clients_dropped"][1][-1] == 0.0, "rank 2 never caught up"
    assert all(bool(torch.isfinite(t).all()) for t in _params(run_dir).values())


@pytest.mark.mpi
def test_too_few_survivors_stop_the_run_with_one_line_after_the_retries(tmp_path):
    run_dir = tmp_path / "stop"

    result = helpers.launch([*COMMON, "--rounds", "3", "--min-clients", "4", "--round-retries", "1",
                             "--inject-fault", "nan@rank:2,round:2", "--client-timeout", "30",
                             "--run-dir", str(run_dir)], ranks=3, timeout=150)

    # the nan fault fires in attempt 0 only, so the retry has all four clients: the run completes
    assert result.returncode == 0, result.report()
    kinds = [(r, k) for r, k, _ in read_events(_server_file(run_dir))]
    assert kinds == [(2, "rejected"), (2, "retry")], kinds
    assert list(read_metrics(_server_file(run_dir))["test_acc"][0]) == [1, 2, 3]

    # without a retry the same fault stops the run after round 1, with one line and exit code 3
    stopped = tmp_path / "stopped"
    result = helpers.launch([*COMMON, "--rounds", "3", "--min-clients", "4", "--inject-fault", "nan@rank:2,round:2",
                             "--run-dir", str(stopped)], ranks=3, timeout=150)
    assert result.returncode == 3, result.report()
    lines = [ln for ln in result.output.splitlines() if "stopped:" in ln]
    assert len(lines) == 1 and lines[0].startswith("[r00] stopped: round 2: 3 of 4 selected clients survived "
                                                   "(--min-clients 4; dropped: [2])"), result.report()
    assert f"--resume {stopped}" in lines[0] and "Traceback" not in result.output, result.report()
    assert [k for _, k, _ in read_events(_server_file(stopped))] == ["rejected", "stopped"]
    assert list(read_metrics(_server_file(stopped))["test_acc"][0]) == [1]


# ------------------------------------------------------------ kill -9 and resume


@pytest.mark.mpi
def test_kill_9_of_a_client_rank_ends_the_job_and_resume_ends_like_an_uninterrupted_run(tmp_path):
    rounds, run_dir, whole = 5, tmp_path / "killed", tmp_path / "whole"
    # Execute: wait for round 2's checkpoint, then kill -9 client rank 1 mid-run
    proc = helpers.start_until_checkpoint([*COMMON, "--rounds", str(rounds), "--run-dir", str(run_dir)], run_dir, 2,
                                          timeout=120)
    with helpers.reaped(proc):
        victim = helpers.rank_pid(proc.pid, 1)
        assert victim is not None and proc.poll() is None, "the job ended or never reached round 2"
        os.kill(victim, signal.SIGKILL)
        done_before = helpers.checkpoint_round(run_dir)
        ended_after, output = helpers.wait_for(proc, 60)

    # Assert: the whole job ended at once, with an error, before it had finished its rounds
    assert proc.returncode != 0 and ended_after < 30, (proc.returncode, ended_after, output[-2000:])
    assert done_before < rounds, "the kill came after the last round; the test proves nothing"
    resumed = helpers.launch(["--resume", str(run_dir)], ranks=3, timeout=150)
    assert resumed.returncode == 0, resumed.report()
    assert main(COMMON + ["--rounds", str(rounds), "--run-dir", str(whole)]) == 0
    _assert_bitwise(_params(run_dir), _params(whole), "killed + resumed (3 ranks) vs uninterrupted reference")
    for rank, key in [(0, "test_acc"), (1, "bytes_sent/update"), (2, "bytes_sent/update")]:
        steps = read_metrics(run_dir / "metrics" / f"rank{rank:05d}.h5")[key][0]
        assert list(steps) == list(range(1, rounds + 1)), (rank, key, steps)
    resumes = [r for r, k, _ in read_events(_server_file(run_dir)) if k == "resume"]
    assert len(resumes) == 1 and resumes[0] >= 2
