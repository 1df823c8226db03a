"""The simulated clock and the device profiles (``--devices``): hand computations, the server's
queue, the profiles' files and errors, the memory check, and that the clock prices what the cost
accounting counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sfprompt_mpi import run
from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.config import build_config, config_from_dict, load_toml
from sfprompt_mpi.devices import Device, Devices, Server, from_record, resolve
from sfprompt_mpi.comm.protocol import HEADER_BYTES
from sfprompt_mpi.estimate import batch_sizes, run_pass_flops
from sfprompt_mpi.simclock import SimClock, client_plan, simulate

#: FLOPs per sample of each pass in the hand-made example.
PASSES = dataclasses.make_dataclass("Passes", [("head_fwd", int, 1), ("body_fwd", int, 2), ("tail_fwd", int, 1),
                                               ("tail_bwd", int, 1), ("body_bwd", int, 2), ("head_bwd", int, 1)])()
BYTE_PER_S = 8e-6  # Mbit/s that move one byte per second


def _two_clients() -> tuple[dict[int, list], Devices]:
    """Client 0: 2 FLOP/s, 1 B/s up, 2 B/s down, no latency; client 1: 1 FLOP/s, 1 B/s both ways,
    1 s latency; server: 1 FLOP/s. Each: 2 B of parameters, 4 FLOPs before split training, two
    batches of one sample (1 B messages, gradients back), a 2 B update."""
    plans = {c: client_plan(params_bytes=2, pre_flops=4, requests=[(1, 1, True), (1, 1, True)], update_bytes=2,
                            f=PASSES) for c in (0, 1)}
    devices = Devices("hand", Server(tflops=1e-12), (
        Device("fast", tflops=2e-12, memory_gb=1, down_mbps=2 * BYTE_PER_S, up_mbps=BYTE_PER_S),
        Device("slow", tflops=1e-12, memory_gb=1, down_mbps=BYTE_PER_S, up_mbps=BYTE_PER_S, latency_ms=1000)))
    return plans, devices


def test_the_clock_equals_a_hand_computation_of_two_clients_and_two_batches():
    # Prepare
    plans, devices = _two_clients()
    # Act
    sim = simulate(plans, devices, aggregate_flops=3)
    # Assert: worked out by hand, step by step, in the module's docstring order (see docs/devices.md).
    fast, slow = sim.clients[0], sim.clients[1]
    assert (fast.compute, fast.down, fast.up, fast.server, fast.finish) == (6, 3, 6, 8, 23)
    assert (slow.compute, slow.down, slow.up, slow.server, slow.finish) == (12, 11, 11, 10, 44)
    assert (fast.idle, slow.idle) == (21, 0)
    assert (sim.seconds, sim.aggregate, sim.server_busy) == (47, 3, 16)


def test_a_server_that_trains_serves_one_client_after_the_other():
    plans, devices = _two_clients()
    sim = simulate(plans, devices, policy="in_turn")
    # Client 0's requests never meet client 1's; client 1's first waits for client 0's update (t = 23).
    assert sim.clients[0].finish == 23
    assert sim.clients[1].server == 21 and sim.clients[1].finish == 55
    assert sim.seconds == 55


def test_the_queue_serves_the_earliest_arrival_first_and_ties_by_client_id():
    # Three clients whose only request arrives at t = 1 (client 2) and t = 2 (clients 0 and 1).
    devices = Devices("q", Server(tflops=1e-12), tuple(
        Device(f"c{c}", tflops=1e-12, memory_gb=1, down_mbps=BYTE_PER_S, up_mbps=BYTE_PER_S) for c in range(3)))
    plans = {0: [("compute", 2), ("server", 3)], 1: [("compute", 2), ("server", 3)], 2: [("compute", 1), ("server", 3)]}
    sim = simulate(plans, devices)
    # Served: client 2 over [1, 4], client 0 over [4, 7], client 1 over [7, 10].
    assert [sim.clients[c].finish for c in (2, 0, 1)] == [4, 7, 10]
    assert [sim.clients[c].server for c in (2, 0, 1)] == [3, 5, 8]


def test_a_fast_server_with_many_clients_and_a_slow_one_with_few_differ_as_the_queue_says():
    one = Device("c", tflops=1e-12, memory_gb=1, down_mbps=BYTE_PER_S, up_mbps=BYTE_PER_S)
    plan = [("compute", 1), ("server", 4)]
    many = simulate({c: plan for c in range(8)}, Devices("m", Server(tflops=4e-12), (one,) * 8))
    few = simulate({c: plan for c in range(2)}, Devices("f", Server(tflops=1e-12), (one,) * 2))
    # 8 requests of 1 s each queue on the fast server (last ends at 1 + 8); 2 of 4 s on the slow one (1 + 8).
    assert many.seconds == pytest.approx(9) and few.seconds == pytest.approx(9)
    assert many.clients[0].server == pytest.approx(1) and few.clients[0].server == pytest.approx(4)
    assert many.clients[7].server == pytest.approx(8) and few.clients[1].server == pytest.approx(8)


def test_the_clock_prices_exactly_what_the_cost_accounting_counts():
    """At 1 FLOP/s and 1 B/s, a client's compute seconds are its FLOPs and its up seconds its bytes."""
    for algo in ("sfprompt", "fl-full", "sfl-linear"):
        cfg = build_config({"fed": {"algo": algo, "batch_size": 16}})
        algorithm, f = build_algorithm(cfg), run_pass_flops(cfg, 10)
        shard, kept = 50, algorithm.kept_count(50)
        act = HEADER_BYTES + 16 * 4  # any message size: only the bytes are summed
        grad = algo == "sfprompt"
        requests = {0: [(i, b, act, grad) for i, b in enumerate(batch_sizes(kept, 16))]} if algorithm.split else {}
        devices = Devices("unit", Server(tflops=1e-12),
                          (Device("c", tflops=1e-12, memory_gb=1, down_mbps=BYTE_PER_S, up_mbps=BYTE_PER_S),))
        clock = SimClock(devices, algorithm, f, numel=7, policy="fifo")
        sim = clock.round({0: shard}, requests, {0: 1000}, params_bytes=1000)
        assert sim.clients[0].compute == sum(algorithm.client_flops(shard, f).values()), algo
        assert sim.clients[0].server == algorithm.server_flops(shard, f), algo
        assert sim.clients[0].up == 1000 + len(requests.get(0, [])) * act * (2 if grad else 1), algo


# ---------------------------------------------------------------------- profiles


def test_presets_resolve_seeded_and_the_record_rebuilds_them():
    a, b = resolve("jetson", 80, seed=1), resolve("jetson", 80, seed=1)
    assert a == b and a != resolve("jetson", 80, seed=2)
    names = [d.name for d in a.clients]
    assert (names.count("tx2"), names.count("xavier-nx"), names.count("agx-xavier")) == (30, 40, 10)
    assert all(5 <= d.up_mbps <= 50 for d in a.clients)
    assert from_record(a.record(), 80) == a
    assert resolve("none", 4, seed=0) is None
    table1 = resolve("table1", 3, seed=0)
    assert {(d.down_mbps, d.up_mbps) for d in table1.clients} == {(54.0, 12.0)}


def test_a_toml_file_gives_counts_shares_and_ranges(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text('[server]\ntflops = 10\nmbps = 100\n'
                    '[[clients]]\nname = "big"\ncount = 1\ntflops = 4\nmemory_gb = 16\ndown_mbps = 50\nup_mbps = 20\n'
                    '[[clients]]\nname = "small"\nshare = 1.0\ntflops = 1\nmemory_gb = 4\n'
                    'down_mbps = [10, 20]\nup_mbps = 5\nlatency_ms = 30\n')
    devices = resolve(str(path), 4, seed=0)
    assert [d.name for d in devices.clients] == ["big", "small", "small", "small"]
    assert devices.server == Server(tflops=10, mbps=100)
    assert all(10 <= d.down_mbps <= 20 and d.latency_ms == 30 for d in devices.clients[1:])


def test_a_csv_file_gives_one_row_per_client_and_a_server_row(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text("name,tflops,memory_gb,down_mbps,up_mbps,latency_ms\nserver,20,,,1000,\n"
                    "a,1,8,54,12,5\nb,2,8,54,12,\n")
    devices = resolve(str(path), 2, seed=0)
    assert devices.server == Server(tflops=20, mbps=1000)
    assert [(d.name, d.tflops, d.latency_ms) for d in devices.clients] == [("a", 1, 5), ("b", 2, 0)]


BAD_FILES = {
    "missing.toml": ('[server]\ntflops = 1\n[[clients]]\ntflops = 1\nmemory_gb = 1\ndown_mbps = 1\n', "missing up_mbps"),
    "zero.toml": ('[server]\ntflops = 1\n[[clients]]\ncount = 4\ntflops = 0\nmemory_gb = 1\ndown_mbps = 1\n'
                  'up_mbps = 1\n', "tflops must be > 0"),
    "negative.csv": ("name,tflops,memory_gb,down_mbps,up_mbps,latency_ms\nserver,1,,,,\n"
                     + "a,1,1,-5,1,0\n" * 4, "down_mbps must be > 0"),
    "few.toml": ('[server]\ntflops = 1\n[[clients]]\ncount = 3\ntflops = 1\nmemory_gb = 1\ndown_mbps = 1\n'
                 'up_mbps = 1\n', "3 client profile(s) for 4 clients"),
    "noserver.toml": ('[[clients]]\ncount = 4\ntflops = 1\nmemory_gb = 1\ndown_mbps = 1\nup_mbps = 1\n',
                      "no [server] table"),
}


@pytest.mark.parametrize("name", [*BAD_FILES, "no-such-preset", "absent.toml"])
def test_a_bad_profile_exits_2_with_one_line_before_anything_is_written(tmp_path, capsys, name):
    # Prepare
    spec = name
    if name in BAD_FILES:
        (tmp_path / name).write_text(BAD_FILES[name][0])
        spec = str(tmp_path / name)
    run_dir = tmp_path / "run"
    # Act
    code = run.main(["--devices", spec, "--clients", "4", "--rounds", "1", "--run-dir", str(run_dir)])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --devices"), err
    want = BAD_FILES[name][1] if name in BAD_FILES else ("neither a preset" if name == "no-such-preset"
                                                          else "no such file")
    assert want in err[0]
    assert not run_dir.exists()


def test_a_client_whose_memory_cannot_hold_its_part_is_refused_at_setup(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text('[server]\ntflops = 1\n[[clients]]\nname = "roomy"\ncount = 3\ntflops = 1\nmemory_gb = 8\n'
                    'down_mbps = 1\nup_mbps = 1\n[[clients]]\nname = "cramped"\ntflops = 1\nmemory_gb = 0.001\n'
                    'down_mbps = 1\nup_mbps = 1\n')
    code = run.main(["--devices", str(path), "--clients", "4", "--rounds", "1", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "client 3 (cramped, 0.001 GB) cannot hold" in err[0] and "--batch-size" in err[0]


def test_the_resolved_profiles_are_kept_in_config_toml_and_resume_keeps_them(tmp_path):
    # Prepare: a file with a drawn range; the run records what was drawn.
    path = tmp_path / "devices.toml"
    path.write_text('[server]\ntflops = 1\n[[clients]]\nshare = 1.0\ntflops = 1\nmemory_gb = 8\n'
                    'down_mbps = [10, 90]\nup_mbps = 5\n')
    run_dir = tmp_path / "run"
    flags = ["--devices", str(path), "--clients", "2", "--max-train-samples", "120", "--max-test-samples", "40"]
    assert run.main([*flags, "--rounds", "1", "--run-dir", str(run_dir)]) == 0
    saved = load_toml(run_dir / "config.toml")["devices"]
    # Act: the file changes; the run continues.
    path.write_text('[server]\ntflops = 1\n[[clients]]\nshare = 1.0\ntflops = 1\nmemory_gb = 8\n'
                    'down_mbps = 1\nup_mbps = 1\n')
    assert run.main(["--resume", str(run_dir), "--rounds", "2"]) == 0
    # Assert: the saved profiles, not the file's new ones, priced both rounds.
    assert load_toml(run_dir / "config.toml")["devices"] == saved
    cfg = config_from_dict(load_toml(run_dir / "config.toml"))
    assert cfg.devices == saved and 10 <= saved["down_mbps"][0] <= 90
    from sfprompt_mpi.metrics.h5 import read_metrics
    rounds = read_metrics(Path(run_dir) / "metrics" / "rank00000.h5")["sim/round_s"]
    assert list(rounds[0]) == [1, 2] and rounds[1][0] == pytest.approx(rounds[1][1], rel=1e-9)


# ---------------------------------------------------------------------- analyze


@pytest.fixture(scope="module")
def jetson_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sim") / "run"
    assert run.main(["--devices", "jetson", "--clients", "4", "--rounds", "2", "--max-train-samples", "160",
                     "--max-test-samples", "40", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_analyze_reports_time_to_target_and_each_clients_simulated_time(jetson_run, capsys):
    import csv
    import json
    from sfprompt_mpi import analyze
    from sfprompt_mpi.metrics.h5 import read_metrics
    # Act: a target every run reaches in its first round.
    assert analyze.main([str(jetson_run), "--target-acc", "0"]) == 0
    # Assert
    printed = capsys.readouterr().out
    assert "simulated time to target [s]" in printed and "idle [s]" in printed
    out = jetson_run / "analysis"
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    sim = read_metrics(jetson_run / "metrics" / "rank00000.h5")
    assert summary["target_round"] == 1 and summary["target_sim_s"] == pytest.approx(sim["sim/round_s"][1][0])
    assert summary["sim_s"] == pytest.approx(sim["sim/round_s"][1].sum())
    with open(out / "sim_clients.csv") as fh:
        clients = list(csv.DictReader(fh))
    assert [int(c["client"]) for c in clients] == [0, 1, 2, 3]
    assert {c["device"] for c in clients} <= {"tx2", "xavier-nx", "agx-xavier"}
    assert min(float(c["idle_s"]) for c in clients) == 0.0  # the straggler waits for nobody
    for png in ("sim_clients.png", "accuracy_vs_simtime.png"):
        assert (out / png).stat().st_size > 1000


def test_analyze_refuses_a_target_that_is_no_accuracy(jetson_run, capsys):
    from sfprompt_mpi import analyze
    assert analyze.main([str(jetson_run), "--target-acc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target-acc 2" in err[0]


# ---------------------------------------------------------------------- cost


@pytest.mark.slow  # prices a round of every algorithm
def test_cost_prices_fedavgs_round_on_the_table1_links_as_a_hand_computation(tmp_path, capsys):
    import json
    from sfprompt_mpi import cost
    from sfprompt_mpi.estimate import FLOAT32_BYTES, run_pass_flops
    # Act
    out = tmp_path / "cost.json"
    assert cost.main(["--downlink-mbps", "54", "--uplink-mbps", "12", "--clients", "4",
                      "--samples-per-client", "100", "--algos", "sfprompt,fl-full,sfl-full", "--json", str(out)]) == 0
    # Assert: FedAvg full fine-tuning = one parameter message down and one up, plus its training.
    r = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "paper's Table 1: SFPrompt 3.505 min" in printed
    cfg = build_config({"fed": {"algo": "fl-full", "clients": 4}})
    f, numel = run_pass_flops(cfg, 10), r["params"]["fedavg_exchanged"]
    message = HEADER_BYTES + FLOAT32_BYTES * numel
    want = (8 * message / 54e6 + 8 * message / 12e6 + 100 * (f.model_fwd + f.model_bwd) / 1.3e12
            + 4 * numel / 35.6e12)
    assert r["run_time"]["fl-full"]["round_s"] == pytest.approx(want, rel=1e-12)
    assert set(r["run_time"]) == {"sfprompt", "fl-full", "sfl-full", "devices"}


def test_cost_refuses_a_downlink_without_an_uplink(capsys):
    from sfprompt_mpi import cost
    assert cost.main(["--downlink-mbps", "54"]) == 2
    assert "--downlink-mbps and --uplink-mbps go together" in capsys.readouterr().err
