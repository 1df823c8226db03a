"""Communication accounting: the bytes a round must move, from the config alone.

The counts mirror the wire exactly (every message is a header of
``HEADER_BYTES`` plus its payload), so for a finished run the estimate equals
what the transports counted. Shape legend: B batch, N tokens, D width,
F flat trainable parameters.
"""

from __future__ import annotations

import math
from typing import Iterable

from ..comm.protocol import HEADER_BYTES
from ..config import Config
from ..fed.pruning import keep_count

WIRE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the mini-batches over n samples."""
    return [min(batch_size, n - s) for s in range(0, n, batch_size)]


def client_round_bytes(shard: int, cfg: Config, *, tokens: int, width: int, flat: int,
                       need_grad: bool) -> dict[str, dict[str, int]]:
    """Bytes one SFPrompt client sends ('up') and receives ('down') in one round, per message kind.

    ``shard`` is the client's local sample count, ``flat`` the trainable vector length F.
    START (shared by the clients of one host) is counted by :func:`round_bytes`.
    """
    wire = WIRE_BYTES[cfg.comm.wire_dtype]
    kept = keep_count(shard, cfg.fed.keep_ratio) if cfg.fed.keep_ratio < 1 else shard
    batches = batch_sizes(kept, cfg.fed.batch_size) * cfg.fed.split_epochs
    act = sum(HEADER_BYTES + b * tokens * width * wire for b in batches)
    up = {"acts": act, "update": HEADER_BYTES + 4 * flat}
    down = {"params": HEADER_BYTES + 4 * flat, "body_out": act}
    if need_grad:
        up["grad_out"] = act
        down["grad_acts"] = act
    return {"up": up, "down": down}


def round_bytes(shards: dict[int, int], hosts: dict[int, list[int]], selected: Iterable[int], cfg: Config, *,
                tokens: int, width: int, flat: int, need_grad: bool) -> dict[str, dict[str, int]]:
    """Bytes the server receives ('up') and sends ('down') in one round, per kind.

    ``shards`` maps client id -> local sample count; ``hosts`` rank -> client ids.
    """
    selected = set(selected)
    up: dict[str, int] = {}
    down: dict[str, int] = {"start": 0}
    for rank, cids in hosts.items():
        mine = [c for c in cids if c in selected]
        down["start"] += HEADER_BYTES + 8 * len(mine)
        for c in mine:
            one = client_round_bytes(shards[c], cfg, tokens=tokens, width=width, flat=flat, need_grad=need_grad)
            for total, part in ((up, one["up"]), (down, one["down"])):
                for kind, n in part.items():
                    total[kind] = total.get(kind, 0) + n
    return {"up": up, "down": down}


def describe_plan(cfg: Config, hosts: dict[int, list[int]], world_size: int, threads: int) -> str:
    """The --dry-run report: split, parameter counts, placement, samples and bytes per round."""
    from ..data.datasets import check_dataset_files
    from ..fed.state import Layout, trainable_names
    from ..model.split import PromptedViT
    from ..model.vit import build_backbone
    import torch

    n_train, classes = check_dataset_files(cfg.data)
    with torch.device("meta"):
        vit = build_backbone(cfg.model, classes, meta=True)
        model = PromptedViT(vit, cfg.model.head_blocks, cfg.model.tail_blocks, cfg.model.prompt_len,
                            cfg.model.prompt_depth)
    layout = Layout(model, trainable_names(model, cfg))
    params = dict(model.named_parameters())
    count = {part: sum(math.prod(params[n].shape) for n in model.names_in(part)) for part in ("head", "body", "tail")}
    n_clients = sum(len(c) for c in hosts.values())
    per_client = n_train // n_clients
    k = max(1, round(cfg.fed.fraction * n_clients))
    need_grad = cfg.model.prompt_len > 0 or cfg.model.train_head
    one = client_round_bytes(per_client, cfg, tokens=model.tokens, width=model.width, flat=layout.numel,
                             need_grad=need_grad)
    up, down = sum(one["up"].values()), sum(one["down"].values())
    spread = sorted({len(c) for c in hosts.values()})
    lines = [
        f"plan: {cfg.fed.algo} on {cfg.data.dataset} ({n_train} training samples, {classes} classes), "
        f"{cfg.fed.rounds} rounds",
        f"  model {cfg.model.name}: depth {model.depth}, {model.tokens} tokens x {model.width} wide on the wire",
        f"  head  {cfg.model.head_blocks} blocks + {cfg.model.prompt_len} {cfg.model.prompt_depth} prompts: "
        f"{count['head']:,} parameters (client)",
        f"  body  {model.depth - cfg.model.head_blocks - cfg.model.tail_blocks} blocks: {count['body']:,} "
        f"parameters (server, frozen)",
        f"  tail  {cfg.model.tail_blocks} blocks + norm + classifier: {count['tail']:,} parameters (client)",
        f"  trainable and exchanged: {layout.numel:,} parameters",
        f"  world: {world_size} rank(s), {threads} torch thread(s) each; {n_clients} clients on "
        f"{len(hosts)} client rank(s) ({'-'.join(map(str, spread))} per rank); {k} selected per round",
        f"  samples per client: ~{per_client} ({cfg.data.partition} partition), "
        f"kept after pruning: ~{keep_count(per_client, cfg.fed.keep_ratio)}",
        f"  bytes per client per round: ~{up / 1e6:.3f} MB up, ~{down / 1e6:.3f} MB down "
        f"({cfg.comm.wire_dtype} on the wire); per round in all: ~{k * (up + down) / 1e6:.3f} MB",
        "dry run: config and world size are valid; nothing was trained or written",
    ]
    return "\n".join(lines)
