"""LoRA on a timm VisionTransformer, through Hugging Face ``peft``.

``add_lora(vit, ranks, targets, alpha)`` injects peft LoRA layers into the
projections ``targets`` (``qkv``, ``proj``: attention; ``fc1``, ``fc2``: MLP)
of the blocks in ``ranks`` (block index -> rank; peft's ``rank_pattern``), so
a run may put LoRA on the last blocks only (its depth, counted from the
output) and give each block its own rank. ``B`` starts at zero: a model with
fresh LoRA computes exactly what the backbone does.

Names. peft wraps each target Linear and moves its weight to
``...qkv.base_layer.weight``; the factors are ``...qkv.lora_A.default.weight``
(rank x in) and ``...qkv.lora_B.default.weight`` (out x rank). peft cannot
keep timm's name for the wrapped weight, so the backbone's pretrained weights
and ``--checkpoint`` are loaded before LoRA is added (``build_model`` does),
and state-dict hooks on the ViT translate ``base_layer.`` away:
``vit.state_dict()`` and ``vit.load_state_dict()`` speak timm's names. The
factors and the classifier are what a run trains, exchanges and checkpoints.

A client of rank ``r`` below the model's rank ``R`` of a block uses the first
``r`` rows of A and columns of B and holds the rest at zero
(:func:`lora_index`): zero rows and columns get zero gradients, so they stay
zero, and the client's factors are exactly those of a rank-``r`` LoRA.
"""

from __future__ import annotations

import re

import torch
from torch import nn

#: --lora-targets names -> the Linear inside a timm Block.
TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_BASE = ".base_layer."


def parse_targets(spec: str) -> list[str]:
    """``"qkv,fc2"`` -> ``["qkv", "fc2"]`` (ValueError naming an unknown one)."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if not names or bad:
        raise ValueError(f"LoRA targets must be some of {', '.join(TARGETS)}, got {spec!r}")
    return names


def add_lora(vit: nn.Module, ranks: dict[int, int], targets: list[str], alpha: float) -> None:
    """LoRA of rank ``ranks[b]`` on the ``targets`` of each block ``b`` in ``ranks``. In place."""
    from peft import LoraConfig, inject_adapter_in_model

    blocks = sorted(b for b, r in ranks.items() if r > 0)
    modules = [f"blocks.{b}.{TARGETS[t]}" for b in blocks for t in targets]
    pattern = "|".join(re.escape(m) for m in modules)
    config = LoraConfig(r=max(ranks[b] for b in blocks), lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=rf"^(?:{pattern})$",
                        rank_pattern={m: ranks[block_of("." + m)] for m in modules})
    inject_adapter_in_model(config, vit)
    vit._register_state_dict_hook(_timm_names)
    vit.register_load_state_dict_pre_hook(_peft_names)


def _timm_names(module, state: dict, prefix: str, local_metadata) -> dict:
    """state_dict hook: ``...qkv.base_layer.weight`` -> ``...qkv.weight``."""
    for key in [k for k in state if _BASE in k]:
        state[key.replace(_BASE, ".")] = state.pop(key)
    return state


def _peft_names(module, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: timm's names of wrapped weights -> peft's ``base_layer`` names."""
    wrapped = {n.replace(_BASE, "."): n for n, _ in module.named_parameters() if _BASE in n}
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] in wrapped]:
        state[prefix + wrapped[key[len(prefix):]]] = state.pop(key)


def block_of(name: str) -> int | None:
    """The block index of a parameter name (``vit.blocks.3.attn...`` -> 3), None outside the blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def is_factor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_index(names: list[str], shapes: list[tuple[int, ...]], ranks: dict[int, int]) -> torch.Tensor:
    """Positions in the flat vector (``names``/``shapes``: a Layout's) that a client with ``ranks``
    (block -> rank; a block not in it carries no LoRA for this client) holds: the first ``r`` rows of
    each A, the first ``r`` columns of each B, and every other trained parameter whole."""
    parts, offset = [], 0
    for name, shape in zip(names, shapes):
        size = 1
        for s in shape:
            size *= s
        if is_factor(name):
            r = min(ranks.get(block_of(name), 0), shape[0] if ".lora_A." in name else shape[1])
            if ".lora_A." in name:                      # A: rank x in, rows first
                idx = torch.arange(r * shape[1])
            else:                                       # B: out x rank, the first r columns of each row
                idx = (torch.arange(shape[0]).unsqueeze(1) * shape[1] + torch.arange(r)).reshape(-1)
        else:
            idx = torch.arange(size)
        parts.append(idx + offset)
        offset += size
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
