"""The cost CLI: runs for the small model and for ViT-B/16 on the meta device,
writes well-formed JSON, counts FLOPs consistently with the model's cut, and
refuses bad input with one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from sfprompt_mpi.config import ALGOS, parse_config, per_configuration
from sfprompt_mpi.cost import main
from sfprompt_mpi.errors import EXIT_USER_ERROR

VITB = ["--model", "vit_base_patch16_224", "--prompt-len", "10", "--batch-size", "128", "--clients", "50",
        "--dataset", "cifar10"]


def _cost(argv: list[str], tmp_path, capsys, algos: str = "sfprompt") -> dict:
    """The JSON of ``cost argv``; the per-algorithm table prices only ``algos`` (all: seconds per algorithm)."""
    out = tmp_path / "cost.json"
    assert main([*argv, "--algos", algos, "--json", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


@pytest.mark.slow
def test_small_model_report_and_json(tmp_path, capsys):
    out = tmp_path / "cost.json"

    code = main(["--json", str(out)])

    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert code == 0
    assert "communication SFPrompt / FedAvg full" in printed and "client compute SFPrompt / FedAvg full" in printed
    assert r["model"] == "vit_micro_patch8_32"
    assert r["flops_per_sample_pass"]["body_fwd"] > 0 and r["flops_per_sample_pass"]["body_bwd"] > 0
    assert r["comm_ratio"] == pytest.approx(r["bytes_per_client_round"]["sfprompt"]["total"]
                                            / r["bytes_per_client_round"]["fedavg_full"]["total"])
    assert sorted(r["algorithms"]) == sorted(ALGOS)  # every algorithm by default
    assert all(f"  {name} " in printed for name in ALGOS)


def test_algos_limits_the_table_to_the_named_algorithms_in_registry_order(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["--samples-per-client", "40", "--algos", "fl-full, sfprompt", "--json", str(out)]) == 0

    table = capsys.readouterr().out.split("per algorithm")[1]
    r = json.loads(out.read_text())
    assert sorted(r["algorithms"]) == ["fl-full", "sfprompt"]
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["sfprompt", "fl-full"]
    assert r["algorithms"]["sfprompt"]["client_flops_per_sample"] == pytest.approx(
        sum(r["flops_per_client_round"]["sfprompt_client"][k] for k in ("local", "el2n", "split")) / 40)


@pytest.mark.parametrize("spec, words", [("nope", "unknown nope"), (",", "no algorithm")])
def test_algos_refuses_unknown_names_in_one_line(spec, words, capsys):
    assert main(["--algos", spec]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "choose from all, sfprompt" in err[0], err


@pytest.mark.slow
def test_round_totals_multiply_out_the_per_sample_passes(tmp_path, capsys):
    r = _cost(["--samples-per-client", "100", "--keep-ratio", "0.3", "--local-epochs", "2", "--split-epochs", "3",
               "--fedavg-epochs", "2"], tmp_path, capsys)

    f, c = r["flops_per_sample_pass"], r["flops_per_client_round"]
    assert r["kept_per_client"] == 30
    assert c["sfprompt_client"]["local"] == 2 * 100 * (f["local_fwd"] + f["local_bwd"])
    assert c["sfprompt_client"]["el2n"] == 100 * f["local_fwd"]
    assert c["sfprompt_client"]["split"] == 3 * 30 * (f["head_fwd"] + f["head_bwd"] + f["tail_fwd"] + f["tail_bwd"])
    assert c["sfprompt_server"] == 3 * 30 * (f["body_fwd"] + f["body_bwd"])
    assert c["fedavg_full_client"] == 2 * 100 * (f["full_fwd"] + f["full_bwd"])


@pytest.mark.slow
def test_flops_follow_the_cut_without_prompts(tmp_path, capsys):
    # Without prompts the parts are exactly the backbone cut in three, so forward FLOPs add up.
    r = _cost(["--prompt-len", "0", "--keep-ratio", "1.0"], tmp_path, capsys)

    f = r["flops_per_sample_pass"]
    assert f["head_fwd"] + f["body_fwd"] + f["tail_fwd"] == f["full_fwd"]
    assert f["local_fwd"] == f["head_fwd"] + f["tail_fwd"]
    assert f["head_bwd"] == f["body_bwd"] == 0  # nothing before the cut trains: no gradient crosses it
    assert r["flops_per_client_round"]["sfprompt_client"]["el2n"] == 0
    assert set(r["bytes_per_client_round"]["sfprompt"]["up"]) == {"acts", "update"}


@pytest.mark.slow
def test_vit_base_on_meta_device_saves_client_compute_and_communication(tmp_path, capsys):
    # 200 samples per client: below the ~490-sample break-even of this cut at float32 and keep 0.5.
    vitb = _cost([*VITB, "--samples-per-client", "200"], tmp_path, capsys)
    vitl = _cost([*VITB, "--model", "vit_large_patch16_224", "--samples-per-client", "200"], tmp_path, capsys)

    assert vitb["flops_per_sample_pass"]["full_fwd"] == pytest.approx(35.1e9, rel=0.01)  # ViT-B/16: 17.6 GMACs
    assert vitb["flops_per_sample_pass"]["body_fwd"] > 0
    fr = vitb["flops_per_client_round"]
    assert fr["sfprompt_client"]["total"] < fr["fedavg_full_client"]
    assert vitb["client_compute_percent"] < 100
    assert vitb["comm_ratio"] < 1
    assert vitl["comm_ratio"] < vitb["comm_ratio"]  # activations grow with width, parameters faster
    assert vitb["params"]["fedavg_exchanged"] == pytest.approx(85.8e6, rel=0.01)


@pytest.mark.slow
def test_bfloat16_wire_halves_activation_bytes(tmp_path, capsys):
    f32 = _cost(["--samples-per-client", "64"], tmp_path, capsys)
    bf16 = _cost(["--samples-per-client", "64", "--wire-dtype", "bfloat16"], tmp_path, capsys)

    # 64 samples, keep 0.5 -> 32 kept -> one batch of 32: one header plus B x N x D elements
    elements = 32 * f32["tokens"] * f32["width"]
    assert f32["bytes_per_client_round"]["sfprompt"]["up"]["acts"] == 120 + 4 * elements
    assert bf16["bytes_per_client_round"]["sfprompt"]["up"]["acts"] == 120 + 2 * elements
    assert bf16["bytes_per_client_round"]["sfprompt"]["up"]["update"] == f32["bytes_per_client_round"]["sfprompt"]["up"]["update"]


@pytest.mark.parametrize("argv, words", [
    (["--model", "vit_nonexistent_patch16"], "unknown model"),
    (["--samples-per-client", "-3"], "--samples-per-client"),
    (["--head-blocks", "3", "--tail-blocks", "3"], "depth"),
    (["--no-such-flag"], "bad command line"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    code = main(argv)

    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and words in err


@pytest.mark.slow
def test_json_goes_to_stdout_for_dash_and_an_unwritable_path_is_one_line(tmp_path, capsys):
    assert main(["--algos", "sfprompt", "--json", "-"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("\n{") + 1:])["model"] == "vit_micro_patch8_32"

    nested = tmp_path / "new" / "dir" / "cost.json"
    assert main(["--algos", "sfprompt", "--json", str(nested)]) == 0
    assert json.loads(nested.read_text())["model"] == "vit_micro_patch8_32"

    blocker = tmp_path / "file"
    blocker.write_text("")
    capsys.readouterr()
    assert main(["--json", str(blocker / "cost.json")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write --json {blocker / 'cost.json'}:"), err


def test_counts_are_memoised_per_configuration_and_each_caller_gets_its_own_copy():
    calls: list[tuple[str, int]] = []

    @per_configuration()
    def whole(cfg, n):
        calls.append(("whole", n))
        return {"n": n}

    @per_configuration("model")
    def model_only(cfg, n):
        calls.append(("model", n))
        return {"n": n}

    base, same, other_lr = parse_config([]), parse_config([]), parse_config(["--lr", "0.5"])
    first = whole(base, 1)
    first["n"] = 99                                   # a caller changing its copy changes no later answer
    assert whole(same, 1) == {"n": 1} and whole(base, 2) == {"n": 2} and whole(other_lr, 1) == {"n": 1}
    assert model_only(base, 1) == model_only(other_lr, 1) == {"n": 1}   # the model alone is the key
    assert model_only(parse_config(["--prompt-len", "3"]), 1) == {"n": 1}
    assert calls == [("whole", 1), ("whole", 2), ("whole", 1), ("model", 1), ("model", 1)]


@pytest.mark.slow
def test_small_models_are_counted_on_cpu_tensors_with_the_meta_devices_results(monkeypatch):
    import torch

    from sfprompt_mpi import estimate
    from sfprompt_mpi.model.vit import build_backbone

    def counts(cfg) -> tuple:
        # the functions under the per-configuration memo, so each call counts afresh
        return (estimate.backbone_flops.__wrapped__(cfg, 10), estimate.run_pass_flops.__wrapped__(cfg, 10),
                estimate.client_memory_bytes.__wrapped__(cfg, 10, 16))

    # a split algorithm whose head trains, FedAvg full and adapters (all twelve were compared once:
    # docs/benchmarks.md, "The suite's time"; the meta device costs about 1.5 s an algorithm)
    for algo in ("sfprompt", "fl-full", "fedpeft-adapter"):
        cfg = parse_config(["--algo", algo, "--clients", "4"])
        torch.manual_seed(3)
        on_cpu = counts(cfg)
        rng_after_cpu = torch.random.get_rng_state()
        monkeypatch.setattr(estimate, "CPU_COUNT_MAX_FLOPS", 0)  # everything on the meta device, as before
        on_meta = counts(cfg)
        monkeypatch.undo()
        assert on_cpu == on_meta, algo
        torch.manual_seed(3)
        assert torch.equal(rng_after_cpu, torch.random.get_rng_state()), f"{algo}: counting drew random numbers"

    from sfprompt_mpi.algorithms.legend import _Costs  # LEGEND's per-depth FLOPs and memory go the same way
    legend = parse_config(["--algo", "legend", "--clients", "4"])
    on_cpu = vars(_Costs(legend, 10))
    monkeypatch.setattr(estimate, "CPU_COUNT_MAX_FLOPS", 0)
    assert vars(_Costs(legend, 10)) == on_cpu
    monkeypatch.undo()

    small = build_backbone(parse_config([]).model, 10, meta=True)
    with estimate.counting(small) as device:
        assert device.type == "cpu" and next(small.parameters()).device.type == "cpu"
    big = build_backbone(parse_config(VITB).model, 10, meta=True)
    with estimate.counting(big) as device:
        assert device.type == "meta" and next(big.parameters()).device.type == "meta"
