"""MergeSFL: the merged body's arithmetic, equality with plain split training, batch-size regulation,
participant selection, and one process = 3 MPI ranks with every mechanism on."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sfprompt_mpi import run
from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.algorithms.base import ClientsView
from sfprompt_mpi.algorithms.mergesfl import genetic_selection, merged_kl, regulate_batches
from sfprompt_mpi.config import build_config
from sfprompt_mpi.devices import Device, Devices, Server
from sfprompt_mpi.estimate import run_pass_flops
from sfprompt_mpi.fed.body import MergedBody
from sfprompt_mpi.simclock import client_plan, simulate

import run_helpers as helpers  # tests/mpi, put on sys.path by tests/conftest.py

SMALL = ["--max-train-samples", "64", "--max-test-samples", "20", "--threads", "1", "--seed", "4"]


def test_the_dispatched_gradient_is_each_clients_own_mean_loss_gradient_and_the_step_the_merged_one():
    # Prepare: the micro model's body, two clients with batches of 2 and 3, SGD without momentum.
    torch.manual_seed(0)
    cfg = build_config({"fed": {"algo": "mergesfl", "optimizer": "sgd", "momentum": 0.0, "lr": 0.5}})
    model = build_algorithm(cfg).build_model(10, quiet=True)
    names = model.names_in("body")
    body = MergedBody(model, torch.device("cpu"), bf16=False, params=names, cfg=cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    acts = [torch.randn(d, model.tokens, model.width) for d in (2, 3)]
    labels = [torch.randint(0, 10, (d,)) for d in (2, 3)]
    # What each client would compute alone: the gradient of its own mean loss, through the old body.
    own, losses = [], []
    for a, y in zip(acts, labels):
        leaf = a.clone().requires_grad_(True)
        loss = F.cross_entropy(model.tail(model.body(leaf)), y)
        own.append(torch.autograd.grad(loss, leaf)[0])
        losses.append(loss)
    merged_loss = F.cross_entropy(model.tail(model.body(torch.cat(acts))), torch.cat(labels))
    merged_grad = torch.autograd.grad(merged_loss, [dict(model.named_parameters())[n] for n in names])
    # Act: the server's pass; each client sends dL_i/d(its body output).
    leaf = torch.cat(acts).requires_grad_(True)
    out = body.forward(leaf)
    grads = []
    for i, (a, y) in enumerate(zip(acts, labels)):
        o = out[sum(len(x) for x in acts[:i]):][:len(a)].detach().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(model.tail(o), y), o)[0])
    g = body.backward(out, leaf, torch.cat(grads), [2, 3])
    # Assert
    torch.testing.assert_close(g[:2], own[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g[2:], own[1], rtol=1e-5, atol=1e-7)
    now = dict(model.named_parameters())
    for n, gm in zip(names, merged_grad):
        torch.testing.assert_close(now[n].detach(), before[n] - 0.5 * gm, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge", [True, False])
def test_with_one_client_and_equal_batches_mergesfl_is_plain_split_training(tmp_path, merge):
    """64 samples, batch 16: 4 iterations are sfl-full's one epoch, batch for batch."""
    flags = [*SMALL, "--clients", "1", "--rounds", "2", "--batch-size", "16"]
    assert run.main([*flags, "--algo", "sfl-full", "--run-dir", str(tmp_path / "sfl")]) == 0
    assert run.main([*flags, "--algo", "mergesfl", "--iterations", "4", "--merge-weights", "uniform",
                     "--merge-features" if merge else "--no-merge-features", "--run-dir", str(tmp_path / "m")]) == 0
    a, b = (load_file(str(tmp_path / d / "checkpoint" / "global.safetensors")) for d in ("sfl", "m"))
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ"


def _hand_devices() -> Devices:
    """Four clients: compute 1, 2, 4, 8 TFLOP/s, uplinks 5, 50, 10, 20 Mbit/s, 5 ms latency."""
    return Devices("hand", Server(tflops=100), tuple(
        Device(f"d{i}", tflops=t, memory_gb=8, down_mbps=4 * u, up_mbps=u, latency_ms=5)
        for i, (t, u) in enumerate(((1, 5), (2, 50), (4, 10), (8, 20)))))


def test_batch_regulation_equalises_the_clients_simulated_iteration_times():
    # Prepare: MergeSFL's view of four unequal devices, all four selected.
    cfg = build_config({"fed": {"algo": "mergesfl", "batch_size": 16, "min_batch": 1, "max_batch": 1000}})
    algo, f = build_algorithm(cfg), run_pass_flops(cfg, 10)
    model = algo.build_model(10, meta=True)
    sample = model.tokens * model.width * 4
    devices = _hand_devices()
    algo.observe_clients(ClientsView(None, devices, f, sample))
    # Act
    batches = algo.regulate([0, 1, 2, 3])
    # Assert: 64 samples in all; one iteration of each client on its own takes about as long as the others'.
    assert sum(batches.values()) == pytest.approx(64, abs=2) and len(set(batches.values())) > 1
    one = {c: client_plan(params_bytes=0, pre_flops=0, requests=[(d, 120 + d * sample, True)], update_bytes=0,
                          f=f)[1:-1] for c, d in batches.items()}
    spans = [simulate({c: plan}, Devices("x", devices.server, devices.clients)).seconds for c, plan in one.items()]
    uniform = [simulate({c: client_plan(params_bytes=0, pre_flops=0, requests=[(16, 120 + 16 * sample, True)],
                                        update_bytes=0, f=f)[1:-1]}, devices).seconds for c in range(4)]
    per_sample = max(s / d for s, d in zip(spans, batches.values()))
    assert max(spans) - min(spans) <= per_sample            # equal to within one sample of the slowest
    assert max(spans) - min(spans) < 0.2 * (max(uniform) - min(uniform))


def test_regulated_batches_stay_within_bounds_and_the_servers_link():
    a, c = np.array([1.0, 0.1, 0.01]), np.zeros(3)
    free = regulate_batches(a, c, merged=60, bounds=(1, 1000), ingress=None)
    assert sum(free.values()) == pytest.approx(60, abs=1) and free[2] > free[1] > free[0]
    bounded = regulate_batches(a, c, merged=60, bounds=(4, 20), ingress=None)
    assert set(bounded.values()) <= set(range(4, 21)) and bounded[0] == 4 and bounded[2] == 20
    slow_link = regulate_batches(a, c, merged=60, bounds=(1, 1000), ingress=10.0)
    t = 60 / (1 / a).sum()  # the iteration time the regulation aims at
    # 10 samples per second over the link: about 10 t samples, each client at least the lower bound (1)
    assert sum(slow_link.values()) <= 10.0 * t + 3 and sum(slow_link.values()) < sum(free.values()) / 5


def test_the_genetic_selection_reaches_the_exhaustive_optimum():
    rng = np.random.default_rng(3)
    counts = rng.multinomial(60, rng.dirichlet(np.full(5, 0.3)), size=10)   # 10 skewed clients, 5 classes
    batches = rng.integers(8, 40, size=10)

    def objective(chosen):
        return merged_kl(counts, chosen, [batches[c] for c in chosen])
    best = min(itertools.combinations(range(10), 4), key=lambda s: objective(list(s)))
    found = genetic_selection(objective, 10, 4, np.random.default_rng(0))
    assert objective(found) == pytest.approx(objective(list(best)), rel=1e-12)
    assert objective(found) < np.median([objective(list(s)) for s in itertools.combinations(range(10), 4)])


def test_kl_selection_picks_the_best_merge_among_the_rounds_candidates_and_rotates(tmp_path):
    from sfprompt_mpi.metrics.h5 import read_metrics
    flags = [*SMALL, "--max-train-samples", "400", "--clients", "8", "--fraction", "0.25", "--rounds", "3",
             "--partition", "dirichlet", "--alpha", "0.1", "--iterations", "2", "--algo", "mergesfl"]
    assert run.main([*flags, "--run-dir", str(tmp_path / "kl")]) == 0
    chosen = read_metrics(tmp_path / "kl" / "metrics" / "rank00000.h5")["selected"][1].astype(int)
    from sfprompt_mpi.data.datasets import build_data
    from sfprompt_mpi.data.partition import partition_indices
    cfg = build_config({"data": {"max_train_samples": 400, "partition": "dirichlet", "alpha": 0.1},
                        "run": {"seed": 4}})
    data = build_data(cfg.data, 32, 4)
    parts = partition_indices(data.train_labels, 8, "dirichlet", alpha=0.1, shards_per_client=2, seed=4)
    counts = np.stack([np.bincount(data.train_labels[p], minlength=10) for p in parts])
    algo = build_algorithm(build_config({"fed": {"algo": "mergesfl"}, "run": {"seed": 4}}))
    for rnd, row in enumerate(chosen, start=1):
        pool = algo.candidates(rnd, 8, 2)
        kls = [merged_kl(counts, list(c), [16, 16]) for c in itertools.combinations(pool, 2)]
        assert set(row.tolist()) <= set(pool) and len(pool) == 4
        assert merged_kl(counts, row.tolist(), [16, 16]) == pytest.approx(min(kls), rel=1e-9)
    assert len({tuple(r) for r in chosen.tolist()}) > 1, "the selection never rotated"


@pytest.mark.mpi
def test_mergesfl_with_every_mechanism_gives_the_same_run_in_one_process_and_on_3_ranks(tmp_path):
    flags = [*SMALL, "--max-train-samples", "240", "--clients", "6", "--fraction", "0.5", "--rounds", "2",
             "--algo", "mergesfl", "--devices", "jetson", "--partition", "dirichlet", "--alpha", "0.3",
             "--iterations", "3"]
    assert run.main([*flags, "--run-dir", str(tmp_path / "one")]) == 0  # one process: this one
    mpi = helpers.launch([*flags, "--run-dir", str(tmp_path / "mpi")], ranks=3, timeout=300)
    assert mpi.returncode == 0, mpi.report()
    a, b = (load_file(str(tmp_path / d / "checkpoint" / "global.safetensors")) for d in ("one", "mpi"))
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)
    from sfprompt_mpi.metrics.h5 import read_metrics
    ma, mb = (read_metrics(Path(tmp_path / d / "metrics" / "rank00000.h5")) for d in ("one", "mpi"))
    for key in ("selected", "agg_weights", "sim/round_s", "sim/client_idle_s"):
        np.testing.assert_array_equal(ma[key][1], mb[key][1], err_msg=key)
    assert len(set(ma["agg_weights"][1][0].tolist())) > 1, "batch regulation gave every client the same batch"


def test_a_client_dropped_mid_round_leaves_the_merge_without_stalling_the_others(tmp_path):
    from sfprompt_mpi.metrics.h5 import read_events, read_metrics
    flags = [*SMALL, "--clients", "4", "--rounds", "2", "--algo", "mergesfl", "--iterations", "3",
             "--inject-fault", "wrong-shape@rank:1,round:1", "--client-timeout", "60"]
    assert run.main([*flags, "--run-dir", str(tmp_path / "r")]) == 0
    m = read_metrics(tmp_path / "r" / "metrics" / "rank00000.h5")
    assert list(m["clients_dropped"][1]) == [1.0, 0.0]
    assert [len(s) for s in m["selected"][1]] == [3, 4]
    assert any(kind == "rejected" for _, kind, _ in read_events(tmp_path / "r" / "metrics" / "rank00000.h5"))
