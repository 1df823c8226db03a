"""The shipped fractal-pretrained backbone and the command that makes it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sfprompt_mpi.config import ModelConfig
from sfprompt_mpi.errors import UserError
from sfprompt_mpi.model.vit import SHIPPED_WEIGHTS, build_backbone
from sfprompt_mpi.pretrain import main as pretrain_main
from sfprompt_mpi.pretrain import sha256_file

MICRO = "vit_micro_patch8_32"


def _record(name: str = MICRO) -> dict:
    return json.loads((SHIPPED_WEIGHTS / f"{name}.json").read_text())


def test_shipped_weights_match_their_record():
    record = _record()
    assert sha256_file(SHIPPED_WEIGHTS / record["weights_file"]) == record["sha256"]
    for key in ("command", "seed", "data", "training", "pretraining_accuracy", "package_version"):
        assert key in record, key
    assert record["command"].startswith("python -m sfprompt_mpi.pretrain")
    assert record["pretraining_accuracy"]["val_heldout_renderings"] > 5 * record["pretraining_accuracy"]["chance"]


def test_default_config_loads_the_shipped_weights_with_a_new_classifier():
    # Prepare
    from safetensors.torch import load_file

    shipped = load_file(str(SHIPPED_WEIGHTS / f"{MICRO}.safetensors"))
    # Execute
    vit = build_backbone(ModelConfig(), num_classes=7)
    random_vit = build_backbone(ModelConfig(pretrained=False), num_classes=7, quiet=True)
    # Assert: every backbone tensor is the shipped one; the classifier is sized for the task
    assert ModelConfig().pretrained
    own = vit.state_dict()
    assert not any(k.startswith("head.") for k in shipped)
    for key, value in shipped.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)
    assert vit.head.weight.shape == (7, vit.embed_dim)
    assert not torch.equal(random_vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def _digit_features(vit) -> tuple[torch.Tensor, ...]:
    from sfprompt_mpi.config import DataConfig
    from sfprompt_mpi.data.datasets import build_data

    data = build_data(DataConfig(), image_size=32, seed=0)
    out = []
    for ds in (data.train, data.test):
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            out += [vit.forward_head(vit.forward_features(x), pre_logits=True), torch.as_tensor(ds.labels)]
    return tuple(out)


def _linear_probe(vit, steps: int = 300) -> float:
    x_tr, y_tr, x_te, y_te = _digit_features(vit)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_tr.shape[1], 10)
    opt = torch.optim.Adam(probe.parameters(), lr=0.01)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((probe(x_te).argmax(1) == y_te).float().mean())


def test_linear_probe_on_digits_beats_the_random_backbone_clearly():
    torch.manual_seed(0)
    shipped = _linear_probe(build_backbone(ModelConfig(), num_classes=10).eval())
    random = _linear_probe(build_backbone(ModelConfig(pretrained=False), num_classes=10, quiet=True).eval())
    assert shipped >= random + 0.1, (shipped, random)


def test_pretrain_command_runs_a_tiny_configuration_end_to_end_and_repeats(tmp_path, capsys):
    # Prepare
    argv = ["--classes", "3", "--per-class", "4", "--val-per-class", "2", "--epochs", "1", "--threads", "1", "--quiet"]
    # Execute
    assert pretrain_main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert pretrain_main([*argv, "--out", str(tmp_path / "b")]) == 0
    # Assert: the record describes the file, the same seed gives the same bytes, and it loads as a checkpoint
    record = json.loads((tmp_path / "a" / f"{MICRO}.json").read_text())
    weights = tmp_path / "a" / f"{MICRO}.safetensors"
    assert record["sha256"] == sha256_file(weights) == sha256_file(tmp_path / "b" / f"{MICRO}.safetensors")
    assert (record["seed"], record["data"]["classes"], record["training"]["epochs"]) == (0, 3, 1)
    assert "--classes 3" in record["command"]
    vit = build_backbone(ModelConfig(checkpoint=str(weights)), num_classes=10)
    assert vit.head.out_features == 10
    assert "held-out accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "vit_huge_patch14_224"], "unknown model"),
    (["--bogus"], "bad command line"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_pretrain_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_missing_or_tampered_shipped_weights_are_clear_errors(tmp_path, monkeypatch):
    import sfprompt_mpi.model.vit as vit_mod

    # No shipped file for this model (the mini model ships none)
    monkeypatch.setattr(vit_mod, "SHIPPED_WEIGHTS", tmp_path)
    with pytest.raises(UserError, match="no shipped pretrained weights; pass --no-pretrained"):
        build_backbone(ModelConfig(), num_classes=10)
    # A file that does not match its record
    (tmp_path / f"{MICRO}.safetensors").write_bytes((SHIPPED_WEIGHTS / f"{MICRO}.safetensors").read_bytes() + b" ")
    (tmp_path / f"{MICRO}.json").write_text((SHIPPED_WEIGHTS / f"{MICRO}.json").read_text())
    with pytest.raises(UserError, match="do not match the SHA-256"):
        build_backbone(ModelConfig(), num_classes=10)


def test_timm_name_without_a_hub_is_the_same_clear_error(monkeypatch):
    import sfprompt_mpi.model.vit as vit_mod

    real = vit_mod.timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(vit_mod.timm, "create_model", offline)
    cfg = ModelConfig(name="vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(UserError, match="could not load pretrained weights for vit_tiny_patch16_224.augreg_in21k"):
        build_backbone(cfg, num_classes=10)
    assert build_backbone(dataclasses.replace(cfg, pretrained=False), num_classes=10, quiet=True).head.out_features == 10


def test_checkpoint_wins_over_the_default_pretrained(tmp_path):
    from safetensors.torch import save_file

    src = build_backbone(ModelConfig(pretrained=False), num_classes=10, quiet=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    vit = build_backbone(ModelConfig(checkpoint=str(tmp_path / "w.safetensors")), num_classes=10)
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
