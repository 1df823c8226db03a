"""The cut model: exact equivalence with timm, split gradients equal end-to-end autograd."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sfprompt_mpi.config import ModelConfig, build_config
from sfprompt_mpi.errors import UserError
from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.fed.state import Layout
from sfprompt_mpi.model.split import PromptedViT, apply_client_cut, build_model
from sfprompt_mpi.model.vit import build_backbone


def _images(b: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,pool", [("vit_micro_patch8_32", "token"), ("test_vit", "token"), ("test_vit", "avg")])
def test_split_without_prompts_equals_timm(name: str, pool: str) -> None:
    # Prepare
    torch.manual_seed(0)
    vit = timm.create_model(name, num_classes=7, global_pool=pool) if name == "test_vit" else \
        build_backbone(ModelConfig(name=name), 7, quiet=True)
    model = PromptedViT(vit, head_blocks=1, tail_blocks=2, prompt_len=0).eval()
    size = vit.patch_embed.img_size[0]
    x = _images(2, size)
    # Execute
    with torch.no_grad():
        split = model.tail(model.body(model.head(x)))
        whole = vit(x)
    # Assert
    torch.testing.assert_close(split, whole, rtol=0, atol=0)


@pytest.mark.parametrize("depth_mode,train_head", [("shallow", False), ("deep", False), ("deep", True)])
def test_split_gradients_equal_end_to_end_autograd(depth_mode: str, train_head: bool) -> None:
    # Prepare: float64 so the comparison can be tight.
    cfg = build_config({"model": {"prompt_len": 4, "prompt_depth": depth_mode, "head_blocks": 2,
                                  "tail_blocks": 1, "train_head": train_head}})
    model = build_model(cfg.model, 10, seed=1, quiet=True).double()
    names = build_algorithm(cfg).trained_names(model)
    params = dict(model.named_parameters())
    x, y = _images(4).double(), torch.tensor([1, 2, 3, 4])

    # Execute: unsplit
    loss = F.cross_entropy(model(x), y)
    whole = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))

    # Execute: split, with detached tensors at each boundary as in the real exchange
    model.zero_grad(set_to_none=True)
    acts = model.head(x)
    server_in = acts.detach().requires_grad_(True)
    body_out = model.body(server_in)
    client_in = body_out.detach().requires_grad_(True)
    F.cross_entropy(model.tail(client_in), y).backward()
    body_out.backward(client_in.grad)          # server: dL/ds from dL/db
    acts.backward(server_in.grad)              # client: into prompts (and head)

    # Assert
    assert any(n.startswith("prompts.") for n in names)
    for n in names:
        torch.testing.assert_close(params[n].grad, whole[n], rtol=0, atol=1e-6, msg=n)


def test_every_parameter_belongs_to_one_part_and_the_client_cut_drops_the_body() -> None:
    cfg = build_config({"model": {"head_blocks": 2, "tail_blocks": 1}})
    model = build_model(cfg.model, 10, seed=0, quiet=True)
    parts = {n: model.part_of(n) for n, _ in model.named_parameters()}
    assert set(parts.values()) == {"head", "body", "tail"}
    assert parts["vit.blocks.1.attn.qkv.weight"] == "head"
    assert parts["vit.blocks.2.attn.qkv.weight"] == "body"
    assert parts["vit.blocks.5.attn.qkv.weight"] == "tail"
    assert parts["vit.head.weight"] == "tail" and parts["prompts.tokens"] == "head"
    names = build_algorithm(cfg).trained_names(model)
    assert all(parts[n] in ("tail",) or n.startswith("prompts.") for n in names)

    apply_client_cut(model)
    left = [n for n, _ in model.named_parameters()]
    assert not [n for n in left if parts[n] == "body"]
    assert Layout(model, names).numel > 0  # the trainable layout survives the cut
    with pytest.raises(RuntimeError, match="body lives on the server"):
        model.body(torch.zeros(1, model.tokens, model.width))


def test_deep_prompts_replace_prompt_tokens_before_each_head_block() -> None:
    cfg = build_config({"model": {"prompt_len": 3, "prompt_depth": "deep", "head_blocks": 2}})
    model = build_model(cfg.model, 10, seed=0, quiet=True)
    assert model.prompts.tokens.shape == (2, 3, model.width)
    x = _images(2)
    before = model.head(x)
    with torch.no_grad():
        model.prompts.tokens[1].add_(1.0)   # only the second block's prompts
    after = model.head(x)
    assert not torch.equal(before, after)
    assert before.shape == (2, model.tokens, model.width)


def test_bad_split_and_unknown_model_are_user_errors() -> None:
    with pytest.raises(UserError, match="must be smaller than"):
        build_model(ModelConfig(head_blocks=3, tail_blocks=3), 10, seed=0, quiet=True)
    with pytest.raises(UserError, match="unknown model"):
        build_model(ModelConfig(name="vit_nonexistent_1"), 10, seed=0, quiet=True)
    with pytest.raises(UserError, match="not a timm VisionTransformer"):
        build_model(ModelConfig(name="resnet18"), 10, seed=0, quiet=True)


def test_local_checkpoint_loads_backbone_and_keeps_new_classifier(tmp_path) -> None:
    # Prepare: a "pretrained" backbone saved with a different classifier size
    torch.manual_seed(3)
    source = build_backbone(ModelConfig(), num_classes=100, quiet=True)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    # Execute
    vit = build_backbone(ModelConfig(checkpoint=str(path)), num_classes=10)
    # Assert
    torch.testing.assert_close(vit.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight, rtol=0, atol=0)
    assert vit.head.weight.shape == (10, vit.embed_dim)

    torch.save({"state_dict": source.state_dict()}, tmp_path / "weights.pth")
    vit2 = build_backbone(ModelConfig(checkpoint=str(tmp_path / "weights.pth")), num_classes=10)
    torch.testing.assert_close(vit2.pos_embed, source.pos_embed, rtol=0, atol=0)

    (tmp_path / "bad.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(UserError, match="cannot be read"):
        build_backbone(ModelConfig(checkpoint=str(tmp_path / "bad.safetensors")), num_classes=10)
    with pytest.raises(UserError, match="does not exist"):
        build_backbone(ModelConfig(checkpoint=str(tmp_path / "missing.pth")), num_classes=10)
