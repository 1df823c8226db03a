"""Every algorithm on the same runtime: single process and 3 MPI ranks agree, and each
trains exactly what it claims (issue: baselines and ablations).

- all eight ``--algo`` values run 2 rounds in one process and under ``mpiexec -n 3``
  (``tests/mpi/all_algos.py``, one launch each), with bitwise equal final parameters
  (``--server-batch 1``; sfl-full serves clients in id order, so it is deterministic too);
- fl-full moves exactly all of the model's parameters each way per client per round;
- fedpeft-bias changes only biases and the classifier, on the server and on the client;
- sfl-full changes the body's weights, sfprompt never does;
- every algorithm writes the same HDF5 layout and is covered by the cost accounting.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfprompt_mpi.comm.protocol import HEADER_BYTES
from sfprompt_mpi.config import ALGOS, build_config, parse_config
from sfprompt_mpi.cost import algorithm_costs
from sfprompt_mpi.data.datasets import build_data
from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.fed.state import Layout
from sfprompt_mpi.metrics.h5 import read_metrics
from sfprompt_mpi.model.split import freeze_except
from sfprompt_mpi.runtime import run_reference

import run_helpers as helpers  # tests/mpi, put on sys.path by tests/conftest.py

FLAGS = ["--clients", "4", "--rounds", "2", "--devices", "jetson", "--max-train-samples", "160", "--max-test-samples", "60",
         "--threads", "1", "--batch-size", "16", "--seed", "5", "--server-batch", "1"]
SCRIPT = str(Path(helpers.__file__).with_name("all_algos.py"))


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("algos")
    from all_algos import run_all  # tests/mpi: the one-process half runs here, with no process to start
    assert run_all(str(base / "single"), FLAGS) == 0
    mpi = helpers.launch([str(base / "mpi"), *FLAGS], ranks=3, script=[SCRIPT], timeout=300)
    assert mpi.returncode == 0, mpi.report()
    return base / "single", base / "mpi"


@pytest.mark.mpi
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_gives_the_same_parameters_in_one_process_and_on_3_ranks(both, algo):
    single, mpi = (load_file(str(b / algo / "checkpoint" / "global.safetensors")) for b in both)

    assert sorted(single) == sorted(mpi)
    differ = [k for k in single if not torch.equal(single[k], mpi[k])]
    assert not differ, f"{algo}: {len(differ)} tensors differ between 1 process and 3 ranks"
    m = read_metrics(both[1] / algo / "metrics" / "rank00000.h5")
    assert list(m["test_acc"][0]) == [1, 2]
    assert all((both[1] / algo / "metrics" / f"rank{r:05d}.h5").is_file() for r in range(3))


@pytest.mark.mpi
def test_fl_full_moves_exactly_every_parameter_each_way_per_client_and_round(both):
    cfg = parse_config(FLAGS + ["--algo", "fl-full"])
    model = build_algorithm(cfg).build_model(10, meta=True)
    numel = sum(p.numel() for p in model.parameters())
    one = HEADER_BYTES + 4 * numel
    m = read_metrics(both[1] / "fl-full" / "metrics" / "rank00000.h5")

    assert list(m["bytes_recv/update"][1]) == [4 * one, 4 * one]
    assert list(m["bytes_sent/params"][1]) == [4 * one, 4 * one]
    assert "bytes_recv/acts" not in m and "bytes_sent/body_out" not in m


def _reference(tmp_path, algo: str):
    cfg = build_config({"fed": {"algo": algo, "clients": 2, "rounds": 1, "batch_size": 16},
                        "data": {"max_train_samples": 64, "max_test_samples": 20}})
    data = build_data(cfg.data, 32, cfg.run.seed)
    model = build_algorithm(cfg).build_model(data.num_classes, quiet=True)
    layout = Layout(model, build_algorithm(cfg).trained_names(model))
    freeze_except(model, set(layout.names))
    before = copy.deepcopy(model)
    server, host = run_reference(cfg, model, layout, data, {1: [0, 1]}, tmp_path / algo)
    return before, server, host


def _changed(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    now = dict(after.named_parameters())
    return {n for n, p in before.named_parameters() if n in now and not torch.equal(p, now[n])}


def test_fedpeft_bias_changes_only_biases_and_the_classifier(tmp_path):
    before, server, host = _reference(tmp_path, "fedpeft-bias")

    for who, model in (("server", server.model), ("client", host.model)):
        changed = _changed(before, model)
        assert changed, f"{who}: nothing trained"
        assert all(n.endswith(".bias") or n.startswith("vit.head.") for n in changed), (who, sorted(changed))
    assert any(n.startswith("vit.blocks.") for n in _changed(before, server.model))


def test_sfl_full_trains_the_body_and_sfprompt_never_does(tmp_path):
    before, server, _ = _reference(tmp_path, "sfl-full")
    body = set(server.model.names_in("body"))
    assert body & _changed(before, server.model), "sfl-full left the body unchanged"
    saved = load_file(str(tmp_path / "sfl-full" / "checkpoint" / "global.safetensors"))
    assert body <= set(saved), "the checkpoint must hold the server-trained body for --resume"

    before, server, _ = _reference(tmp_path, "sfprompt")
    assert not body & _changed(before, server.model)
    assert _changed(before, server.model), "sfprompt trained nothing"


def test_adapters_start_as_the_identity_and_keep_timm_names():
    cfg = build_config({"fed": {"algo": "fedpeft-adapter"}})
    plain = build_algorithm(build_config({"fed": {"algo": "fl-full"}})).build_model(10, quiet=True)
    adapted = build_algorithm(cfg).build_model(10, quiet=True)
    x = torch.randn(2, 3, 32, 32)

    torch.testing.assert_close(adapted(x), plain(x), rtol=0, atol=0)
    assert set(dict(plain.named_parameters())) < set(dict(adapted.named_parameters()))
    assert all(".adapter." in n or n.startswith("vit.head.") for n in build_algorithm(cfg).trained_names(adapted))


@pytest.mark.slow
def test_cost_accounting_covers_every_algorithm():
    cfg = build_config({})
    rows = algorithm_costs(cfg, shard=100, classes=10)

    assert list(rows) == list(ALGOS)
    assert rows["fl-linear"]["exchanged_params"] == 64 * 10 + 10
    assert rows["fl-full"]["server_flops_per_sample"] == 0 < rows["sfprompt"]["server_flops_per_sample"]
    assert rows["sfl-linear"]["bytes_per_client_round"] > rows["fl-linear"]["bytes_per_client_round"]


@pytest.mark.slow
def test_table_runs_each_algorithm_and_the_two_linear_probes_agree(tmp_path, capsys):
    from sfprompt_mpi.table import main

    code = main(["--algos", "fl-linear,sfl-linear", "--rounds", "1", "--out", str(tmp_path / "t"),
                 "--json", str(tmp_path / "t.json"), "--", "--max-train-samples", "96", "--max-test-samples", "40",
                 "--threads", "1", "--clients", "2"])

    assert code == 0
    table = capsys.readouterr().out
    assert "not the paper's setting" in table and "| fl-linear |" in table and "| sfl-linear |" in table
    rows = {r["algo"]: r for r in __import__("json").loads((tmp_path / "t.json").read_text())}
    # The same frozen backbone and classifier, trained on the same batches: split or not, the same numbers.
    a, b = (load_file(str(tmp_path / "t" / n / "checkpoint" / "global.safetensors")) for n in ("fl-linear", "sfl-linear"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows["fl-linear"]["final_acc"] == rows["sfl-linear"]["final_acc"]
    assert rows["sfl-linear"]["mb_per_client_round"] > rows["fl-linear"]["mb_per_client_round"]


def test_table_refuses_an_unknown_algorithm_with_one_line(capsys):
    from sfprompt_mpi.table import main

    assert main(["--algos", "fedsgd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown algorithm fedsgd in --algos (known: " + ", ".join(ALGOS) + ")"]


def test_table_with_a_clients_axis_runs_every_algorithm_at_every_count_and_plots_it(tmp_path, capsys, monkeypatch):
    # Prepare: the FLOP count of every algorithm takes ~10 s per setting; it is not what this test is about.
    import json
    from matplotlib.image import imread
    from sfprompt_mpi import cost, table
    zero = {"exchanged_params": 0, "client_flops_per_sample": 0.0, "server_flops_per_sample": 0.0}
    monkeypatch.setattr(cost, "algorithm_costs", lambda cfg, shard, classes: {a: zero for a in ALGOS})
    out = tmp_path / "fig2"
    # Execute
    code = table.main(["--algos", "fl-linear,sfprompt", "--clients", "2,1", "--rounds", "1", "--out", str(out),
                       "--json", str(tmp_path / "fig2.json"), "--", "--max-train-samples", "48",
                       "--max-test-samples", "20", "--threads", "1"])
    # Assert: one run per (algorithm, clients), each with that many clients; one row per algorithm.
    assert code == 0
    rows = json.loads((tmp_path / "fig2.json").read_text())
    assert [(r["algo"], r["clients"]) for r in rows] == [("fl-linear", 1), ("sfprompt", 1),
                                                          ("fl-linear", 2), ("sfprompt", 2)]
    for r in rows:
        assert Path(r["run_dir"]) == out / f"c{r['clients']}" / r["algo"]
        assert f"clients = {r['clients']}" in (Path(r["run_dir"]) / "config.toml").read_text()
    lines = capsys.readouterr().out.splitlines()
    assert "| algorithm | 1 clients | 2 clients |" in lines
    assert sum(line.startswith("| fl-linear |") or line.startswith("| sfprompt |") for line in lines) == 2
    assert imread(out / "accuracy_vs_clients.png").std() > 0


@pytest.mark.parametrize("argv, needle", [
    (["--clients", "0,2"], "counts >= 1"),
    (["--clients", "two"], "comma-separated client counts"),
    (["--clients", "2", "--", "--clients", "4"], "given twice"),
])
def test_table_refuses_bad_client_counts_with_one_line(capsys, argv, needle):
    from sfprompt_mpi.table import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("algo, has, lacks", [
    ("fl-full", ["whole model on every client", "(every parameter)"], ["prompts", "frozen", "pruning", "wire"]),
    ("fedpeft-adapter", ["whole model on every client", "adapters"], ["prompts", "frozen", "pruning"]),
    ("sfl-full", ["body  4 blocks", "(server, trained by the server)"], ["prompts", "pruning"]),
    ("sfprompt", ["8 shallow prompts", "(server, frozen)", "EL2N pruning keeps 0.5", "kept for split training: ~180"],
     ["whole model"]),
])
def test_dry_run_describes_each_algorithms_own_plan(capsys, algo, has, lacks):
    from sfprompt_mpi.run import main

    assert main(["--algo", algo, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.startswith(f"plan: {algo} on digits")
    for text in has:
        assert text in plan, (text, plan)
    for text in lacks:
        assert text not in plan, (text, plan)


def test_a_setting_the_algorithm_does_not_read_gets_one_warning_line(capsys, tmp_path):
    from sfprompt_mpi.run import main

    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nadapter_dim = 4\n")
    assert main(["--config", str(toml), "--algo", "fl-full", "--local-epochs", "3", "--keep-ratio", "0.3",
                 "--lr", "0.01", "--dry-run"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "does not read" in line]
    assert warned == ["[r00] warning: --algo fl-full does not read --adapter-dim, --local-epochs, --keep-ratio; "
                      "they are ignored"]

    for algo, flags in (("sfprompt", ["--local-epochs", "3", "--keep-ratio", "0.3"]),
                        ("fedpeft-adapter", ["--adapter-dim", "4"]), ("fl-full", [])):
        assert main([*flags, "--algo", algo, "--dry-run"]) == 0
        assert "does not read" not in capsys.readouterr().err, algo


def test_each_algorithm_reads_only_algorithm_settings():
    from sfprompt_mpi.algorithms import algorithm_class
    from sfprompt_mpi.algorithms.base import ALGORITHM_SETTINGS
    from sfprompt_mpi.config import FIELDS

    assert set(ALGORITHM_SETTINGS) <= set(FIELDS)
    for name in ALGOS:
        assert algorithm_class(name).reads <= set(ALGORITHM_SETTINGS), name


def test_the_algorithms_marked_as_importing_peft_are_those_whose_models_carry_its_lora(monkeypatch):
    import peft
    from sfprompt_mpi.algorithms.registry import PEFT_ALGOS
    injected = []
    real = peft.inject_adapter_in_model
    monkeypatch.setattr(peft, "inject_adapter_in_model", lambda *a, **k: injected.append(1) or real(*a, **k))
    # Execute: every algorithm's model, on the meta device
    carries = set()
    for algo in ALGOS:
        injected.clear()
        build_algorithm(parse_config(["--algo", algo])).build_model(10, meta=True)
        if injected:
            carries.add(algo)
    # Assert: the set the memory check reads (world.rank_floor_gb) is exactly the algorithms using peft
    assert carries == set(PEFT_ALGOS)
