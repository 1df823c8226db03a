"""The model cut into head, body and tail, by parameter name.

:class:`PromptedViT` wraps a timm VisionTransformer and a :class:`SoftPrompts`
so that the state dict keeps timm's names (``vit.blocks.3.attn.qkv.weight``)
plus ``prompts.tokens``. Each name belongs to exactly one part:

    head: patch embedding, class/register tokens, position embedding, prompts,
          blocks [0, H)
    body: blocks [H, depth - T)
    tail: blocks [depth - T, depth), final norm, fc_norm, classifier

``tail(body(head(x))) == forward(x)``; the client keeps head and tail and the
server keeps the body (``apply_client_cut`` drops the body's weights on
clients). Nothing here knows about distribution.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ..config import ModelConfig
from ..errors import UserError
from .prompts import SoftPrompts
from .vit import build_backbone

_BLOCK = re.compile(r"^vit\.blocks\.(\d+)\.")
_TAIL_NAMES = ("vit.norm.", "vit.fc_norm.", "vit.head.", "vit.attn_pool.")


class PromptedViT(nn.Module):
    """A VisionTransformer with soft prompts, callable whole or part by part."""

    def __init__(self, vit: VisionTransformer, head_blocks: int, tail_blocks: int,
                 prompt_len: int, prompt_depth: str = "shallow") -> None:
        super().__init__()
        depth = len(vit.blocks)
        if head_blocks + tail_blocks >= depth:
            raise UserError(f"head_blocks + tail_blocks = {head_blocks + tail_blocks} must be smaller than "
                            f"the model's depth {depth} (the server needs at least one body block)")
        self.vit = vit
        self.head_blocks = head_blocks
        self.tail_blocks = tail_blocks
        self.depth = depth
        self.num_prefix = vit.num_prefix_tokens
        self.prompt_len = prompt_len
        self.deep = prompt_depth == "deep"
        if prompt_len > 0:
            layers = max(1, head_blocks) if self.deep else 1
            patch = vit.patch_embed.patch_size
            self.prompts: SoftPrompts | None = SoftPrompts(prompt_len, vit.embed_dim, layers, patch[0] * patch[1])
        else:
            self.prompts = None

    # -- the three parts ---------------------------------------------------
    def head(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images -> smashed activations ``acts_BND`` (N includes prompts)."""
        vit = self.vit
        x_BND = vit.patch_embed(images_BCHW)
        x_BND = vit._pos_embed(x_BND)
        x_BND = vit.patch_drop(x_BND)
        x_BND = vit.norm_pre(x_BND)
        if self.prompts is not None:
            x_BND = self.prompts.insert(x_BND, self.num_prefix)
        for i in range(self.head_blocks):
            if self.deep and self.prompts is not None and i > 0:
                x_BND = self.prompts.replace(x_BND, self.num_prefix, i)
            x_BND = vit.blocks[i](x_BND)
        return x_BND

    def body(self, acts_BND: torch.Tensor) -> torch.Tensor:
        """The server's frozen middle blocks."""
        x_BND = acts_BND
        for i in range(self.head_blocks, self.depth - self.tail_blocks):
            x_BND = self.vit.blocks[i](x_BND)
        return x_BND

    def tail(self, x_BND: torch.Tensor) -> torch.Tensor:
        """Last blocks, final norm, pooling over the original tokens, classifier -> ``logits_BK``."""
        return self.classify(self.tail_features(x_BND))

    def tail_features(self, x_BND: torch.Tensor) -> torch.Tensor:
        """Last blocks and final norm, prompt tokens removed: the tokens timm's pooling expects."""
        vit = self.vit
        for i in range(self.depth - self.tail_blocks, self.depth):
            x_BND = vit.blocks[i](x_BND)
        x_BND = vit.norm(x_BND)
        if self.prompts is not None:
            # Pool over the model's own tokens, so 'avg' and 'map' pooling ignore prompts.
            end = self.num_prefix + self.prompt_len
            x_BND = torch.cat([x_BND[:, :self.num_prefix], x_BND[:, end:]], dim=1)
        return x_BND

    def classify(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(x_BND)

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Pooled tail embeddings (pre-logits), e.g. for t-SNE."""
        x_BND = self.tail_features(self.body(self.head(images_BCHW)))
        return self.vit.forward_head(x_BND, pre_logits=True)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(images_BCHW)))

    def local_forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Head straight into tail, body skipped: SFPrompt's local-loss model."""
        return self.tail(self.head(images_BCHW))

    # -- names ---------------------------------------------------------------
    def part_of(self, name: str) -> str:
        """'head', 'body' or 'tail' for a parameter or buffer name of this module."""
        if name.startswith("prompts."):
            return "head"
        m = _BLOCK.match(name)
        if m:
            i = int(m.group(1))
            if i < self.head_blocks:
                return "head"
            return "tail" if i >= self.depth - self.tail_blocks else "body"
        if name.startswith(_TAIL_NAMES):
            return "tail"
        return "head"

    def names_in(self, *parts: str) -> list[str]:
        return [n for n, _ in self.named_parameters() if self.part_of(n) in parts]

    @property
    def tokens(self) -> int:
        """Tokens N per sample on the wire (prefix + prompts + patches)."""
        return self.num_prefix + self.prompt_len + self.vit.patch_embed.num_patches

    @property
    def width(self) -> int:
        return self.vit.embed_dim


def build_model(cfg: ModelConfig, num_classes: int, seed: int, *, quiet: bool = False,
                prompt_len: int | None = None, adapt: Callable[[PromptedViT], None] | None = None,
                meta: bool = False) -> PromptedViT:
    """The full model, identical on every rank for a given seed.

    ``prompt_len`` overrides ``cfg.prompt_len`` (0 for algorithms without
    prompts); ``adapt`` changes the model in place (an algorithm's adapters),
    drawing from the same seeded generator; ``meta`` builds shapes only (for
    cost accounting)."""
    prompt_len = cfg.prompt_len if prompt_len is None else prompt_len
    if prompt_len < 0:
        raise UserError(f"model.prompt_len must be >= 0, got {prompt_len}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if meta:
            with torch.device("meta"):
                vit = build_backbone(cfg, num_classes, meta=True)
                model = PromptedViT(vit, cfg.head_blocks, cfg.tail_blocks, prompt_len, cfg.prompt_depth)
        else:
            vit = build_backbone(cfg, num_classes, quiet=quiet)
            model = PromptedViT(vit, cfg.head_blocks, cfg.tail_blocks, prompt_len, cfg.prompt_depth)
        if adapt is not None:
            with torch.device("meta" if meta else "cpu"):
                adapt(model)
        return model


def apply_client_cut(model: PromptedViT) -> PromptedViT:
    """Drop the body's weights (a client never holds them). In place."""
    for i in range(model.head_blocks, model.depth - model.tail_blocks):
        model.vit.blocks[i] = nn.Identity()
    model.body = _no_body  # type: ignore[method-assign]
    return model


def _no_body(acts_BND: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this model has been cut for a client: the body lives on the server")


def freeze_except(model: nn.Module, trainable: set[str]) -> None:
    """requires_grad only for the named parameters. In place."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def param_count(model: nn.Module, names: list[str] | None = None) -> int:
    params = dict(model.named_parameters())
    return sum(math.prod(params[n].shape) for n in (names if names is not None else params))
