"""LoRA (fedlora, hetlora, legend): the model's LoRA, per-client parts, aggregation, LEGEND's plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.algorithms.legend import depth_forward, legend_plan
from sfprompt_mpi.algorithms.lora import device_rank
from sfprompt_mpi.config import build_config
from sfprompt_mpi.devices import resolve
from sfprompt_mpi.errors import UserError
from sfprompt_mpi.fed.aggregate import Updates
from sfprompt_mpi.model.lora import lora_index
from sfprompt_mpi.model.split import freeze_except


def _algo(algo: str, devices=None, **model):
    cfg = build_config({"fed": {"algo": algo, "batch_size": 8}, "model": model})
    if devices is not None:
        cfg = dataclasses.replace(cfg, devices=devices.record())
    return build_algorithm(cfg)


def test_lora_with_zero_b_leaves_the_output_unchanged_and_timm_names_stay():
    plain = _algo("fl-full").build_model(10, quiet=True).eval()
    algo = _algo("fedlora", lora_depth=2, lora_ranks="2,4")
    model = algo.build_model(10, quiet=True).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert set(model.state_dict()) - set(plain.state_dict()) == {k for k in model.state_dict() if ".lora_" in k}
    model.load_state_dict({**model.state_dict(), **plain.state_dict()})   # timm's names load
    names = algo.trained_names(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    assert shapes["vit.blocks.4.attn.qkv.lora_A.default.weight"] == (2, 64)
    assert shapes["vit.blocks.5.mlp.fc2.lora_B.default.weight"] == (64, 4)
    assert not any(n.startswith("vit.blocks.3.") for n in names)


def test_lora_index_takes_the_first_rows_of_a_and_columns_of_b():
    names = ["vit.blocks.0.attn.qkv.lora_A.default.weight", "vit.blocks.0.attn.qkv.lora_B.default.weight",
             "vit.blocks.1.attn.qkv.lora_A.default.weight", "vit.head.bias"]
    shapes = [(4, 3), (2, 4), (4, 3), (5,)]
    idx = lora_index(names, shapes, {0: 2})
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 16, 17] + [32, 33, 34, 35, 36]


def test_zero_padded_mean_over_the_holders_equals_a_hand_computation():
    held = {0: torch.tensor([0, 1, 2]), 1: torch.tensor([0, 2]), 2: None}
    updates = Updates(4, True, held.get)
    updates.add(0, torch.tensor([1.0, 2.0, 3.0]), 1)
    updates.add(1, torch.tensor([5.0, 7.0]), 3)
    updates.add(2, torch.tensor([9.0, 10.0, 11.0, 12.0]), 2)
    out = updates.mean(torch.full((4,), -1.0))
    want = torch.tensor([(1 + 15 + 18) / 6, (2 + 20) / 3, (3 + 21 + 22) / 6, 12.0])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    nobody = Updates(3, False, {0: torch.tensor([0])}.get)
    nobody.add(0, torch.tensor([4.0]), 5)
    assert nobody.mean(torch.tensor([0.0, 8.0, 9.0])).tolist() == [4.0, 8.0, 9.0]  # unheld: the global value


def test_hetlora_ranks_follow_the_devices_compute():
    algo = _algo("hetlora", resolve("jetson", 8, 0))
    speeds = algo.cfg.devices["tflops"]
    ranks = [device_rank(algo.cfg, c) for c in range(8)]
    assert {r for r, s in zip(ranks, speeds) if s == max(speeds)} == {8}
    assert all(r == 2 for r, s in zip(ranks, speeds) if s == min(speeds))


def test_a_depth_limited_client_does_no_backward_below_its_lowest_lora_block():
    algo = _algo("legend")
    model = algo.build_model(10, quiet=True)
    freeze_except(model, set(algo.trained_names(model)))
    for block in model.vit.blocks:  # torch's counter misses CPU's fused attention kernel; meta counts it as bmm
        block.attn.fused_attn = False
    algo.start(model, {0: 10})
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    measured = {}
    for d in (1, 6):
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(depth_forward(model, 6 - d)(x), y).backward()
        measured[d] = counter.get_total_flops() // 2
        assert measured[d] == algo.costs.step_flops[d]       # what the clock prices is what runs
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model(x)
    top = torch.randn(2, model.tokens, 64, requires_grad=False)
    with FlopCounterMode(display=False) as bwd:
        out = model.vit.forward_head(model.vit.norm(model.vit.blocks[5](top)))
        F.cross_entropy(out, y).backward()
    # depth 1: the whole forward, plus the backward of the last block and the classifier only
    assert measured[1] * 2 == fwd.get_total_flops() + bwd.get_total_flops() - _forward_flops(model, top)
    assert measured[1] < measured[6]


def _forward_flops(model, top):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.vit.forward_head(model.vit.norm(model.vit.blocks[5](top)))
    return counter.get_total_flops()


def _devices(tmp_path, memory_gb):
    path = tmp_path / "devices.toml"
    path.write_text("[server]\ntflops = 10\n" + "".join(
        f'[[clients]]\nname = "d{i}"\ntflops = {t}\nmemory_gb = {m}\ndown_mbps = 50\nup_mbps = 10\n'
        for i, (t, m) in enumerate(zip((0.001, 0.004, 0.01), memory_gb))))
    return resolve(str(path), 3, 0)


def test_legend_gives_each_device_a_configuration_within_its_time_and_memory(tmp_path):
    algo = _algo("legend")
    algo.start(algo.build_model(10, quiet=True), {0: 40, 1: 40, 2: 40})
    costs = algo.costs
    tight = (costs.memory({5: 8, 4: 8}) + 1) / 1e9       # holds depth 2 at rank 8, not depth 3
    devices = _devices(tmp_path, (64, tight, 64))
    algo = _algo("legend", devices)
    algo.start(algo.build_model(10, quiet=True), {0: 40, 1: 40, 2: 40})
    plan = legend_plan(algo.cfg, costs, algo._shards)
    for c, ranks in plan.items():
        assert costs.memory(ranks) <= devices.clients[c].memory_gb * 1e9
        assert sorted(ranks) == list(range(6 - len(ranks), 6))          # the last blocks
        assert [ranks[b] for b in sorted(ranks)] == sorted(ranks.values())  # ranks rise towards the output
    assert len(plan[1]) <= 2 and len(plan[2]) == 6                    # memory-bound device, fastest device
    assert len(plan[0]) < len(plan[2])                                # the slowest trains fewer blocks
    stats = algo.choices(1, 1)
    assert stats["choice/depth"] == len(plan[1])


def test_legend_refuses_a_device_that_holds_no_configuration(tmp_path):
    algo = _algo("legend")
    with pytest.raises(UserError, match="client 1 .*cannot hold even legend's smallest configuration"):
        algo.check_devices(_devices(tmp_path, (64, 1e-6, 64)), 10)
