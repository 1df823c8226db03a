"""Cost accounting from the config alone: the bytes a round moves and the FLOPs it costs.

Bytes mirror the wire exactly (every message is a header of ``HEADER_BYTES``
plus its payload), so for a finished run the estimate equals what the
transports counted. FLOPs are counted by ``torch.utils.flop_counter`` on the
real head, body and tail modules built on the meta device (shapes only; a small
model is counted on zero-weight CPU tensors instead, see :func:`counting`), so
they follow any timm VisionTransformer and any cut; like every FLOP counter
it counts matrix products, convolutions and attention (2 FLOPs per
multiply-add) and ignores element-wise work (norms, softmax, GELU). Shape legend: B batch,
N tokens, D width, F flat trainable parameters, K classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import build_algorithm
from .comm.protocol import HEADER_BYTES
from .config import WIRE_DTYPES, Config, clients_per_round, per_configuration

if TYPE_CHECKING:
    from .simclock import RoundTime

WIRE_BYTES = {name: getattr(torch, name).itemsize for name in WIRE_DTYPES}
FLOAT32_BYTES = 4  # parameter vectors always travel as float32

def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the mini-batches over n samples."""
    return [min(batch_size, n - s) for s in range(0, n, batch_size)]


def kept_count(shard: int, cfg: Config) -> int:
    """Samples of a ``shard``-sample client that split training uses (EL2N pruning keeps fewer in SFPrompt)."""
    return build_algorithm(cfg).kept_count(shard)


def client_round_bytes(shard: int, cfg: Config, *, tokens: int, width: int, flat: int,
                       need_grad: bool) -> dict[str, dict[str, int]]:
    """Bytes one client sends ('up') and receives ('down') in one round, per message kind.

    ``shard`` is the client's local sample count, ``flat`` the trainable vector length F.
    START (shared by the clients of one host) is counted by :func:`round_bytes`. Kinds that
    carry no message this round are absent, as in the measured counts.
    """
    wire = WIRE_BYTES[cfg.comm.wire_dtype]
    kept = kept_count(shard, cfg)
    batches = batch_sizes(kept, cfg.fed.batch_size) * cfg.fed.split_epochs
    act = sum(HEADER_BYTES + b * tokens * width * wire for b in batches)
    up = {"update": HEADER_BYTES + FLOAT32_BYTES * flat}
    down = {"params": HEADER_BYTES + FLOAT32_BYTES * flat}
    if batches and build_algorithm(cfg).split:
        up["acts"] = down["body_out"] = act
        if need_grad:
            up["grad_out"] = down["grad_acts"] = act
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


def fedavg_client_round_bytes(numel: int) -> dict[str, dict[str, int]]:
    """Bytes one FedAvg client moves in one round when it downloads and uploads ``numel``
    float32 parameters, as this runtime's wire would carry them (PARAMS down, UPDATE up)."""
    one = HEADER_BYTES + FLOAT32_BYTES * numel
    return {"up": {"update": one}, "down": {"params": one}}


def build_meta_model(cfg: Config, num_classes: int):
    """-> (the run's model on the meta device with exactly its client-trained parameters trainable, its Layout)."""
    from .fed.state import Layout
    from .model.split import freeze_except

    algo = build_algorithm(cfg)
    model = algo.build_model(num_classes, meta=True)
    layout = Layout(model, algo.trained_names(model))
    freeze_except(model, set(layout.names) | set(algo.server_trained_names(model)))
    return model, layout


def needs_grad(model, layout) -> bool:
    """Whether split training sends gradients back (GRAD_OUT, GRAD_ACTS): something before the cut trains."""
    return any(model.part_of(n) == "head" for n in layout.names)


def part_sizes(model) -> dict[str, int]:
    """Parameter count of the 'head', 'body' and 'tail' of a PromptedViT."""
    params = dict(model.named_parameters())
    return {part: sum(math.prod(params[n].shape) for n in model.names_in(part)) for part in ("head", "body", "tail")}


@dataclass(frozen=True)
class PassFlops:
    """FLOPs per sample of each pass a round runs; ``bwd`` is what autograd actually computes
    (a frozen part only propagates input gradients, a trainable one also weight gradients).

    ``local`` is head straight into tail (local-loss update and EL2N scoring); ``full`` is the
    whole backbone with every parameter trainable (FedAvg full fine-tuning).
    """

    head_fwd: int
    head_bwd: int
    body_fwd: int
    body_bwd: int
    tail_fwd: int
    tail_bwd: int
    local_fwd: int
    local_bwd: int
    full_fwd: int
    full_bwd: int
    model_fwd: int = 0   # the run's whole model with its own trainable set (non-split algorithms)
    model_bwd: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Meter:
    """``with meter("name"): ...`` adds the FLOPs counted inside to ``meter.counts["name"]``."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, name: str):
        from torch.utils.flop_counter import FlopCounterMode

        @contextmanager
        def scope():
            with FlopCounterMode(display=False) as counter:
                yield
            self.counts[name] = self.counts.get(name, 0) + counter.get_total_flops()
        return scope()


#: Models whose forward costs at most this many FLOPs per sample (estimated as 2 x parameters x patches)
#: are counted on CPU tensors rather than on the meta device (see :func:`counting`).
CPU_COUNT_MAX_FLOPS = 2e7


@contextmanager
def counting(model: nn.Module) -> Iterator[torch.device]:
    """Inside: ``model`` (built on the meta device) is ready for counting FLOPs and saved bytes, on the
    device this yields, where inputs must be made.

    A small model is materialised on the CPU with zero weights, in place: C++ kernels take microseconds
    where the meta device's kernels, written in Python, take about a millisecond an op, so its counts
    take a third of the time and equal the meta device's (``tests/test_cost.py``). Larger models stay
    on the meta device, whose cost does not grow with their size. Attention runs as SDPA's math
    backend on both (the ``bmm`` calls the meta device runs anyway), and the global RNG is left as it was.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = next(model.parameters()).device
    vit = getattr(model, "vit", model)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "meta" and 2 * params * vit.patch_embed.num_patches <= CPU_COUNT_MAX_FLOPS:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.zero_()
        device = torch.device("cpu")
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):
        yield device


def count_full_flops(full: nn.Module, *, batch: int = 2) -> tuple[int, int]:
    """FLOPs per sample of FedAvg full fine-tuning's forward and backward on the backbone ``full``:
    the same for every algorithm of a model, so counted once where several are priced."""
    device = next(full.parameters()).device
    images_BCHW = torch.zeros(batch, 3, *full.patch_embed.img_size, device=device)
    m = _Meter()
    with m("fwd"):
        loss = F.cross_entropy(full(images_BCHW), torch.zeros(batch, dtype=torch.long, device=device))
    with m("bwd"):
        loss.backward()
    return m.counts["fwd"] // batch, m.counts["bwd"] // batch


def count_pass_flops(model, full_flops: tuple[int, int], *, batch: int = 2) -> PassFlops:
    """FLOPs per sample of every pass, counted on the real modules (meta or real device).

    ``model`` is a PromptedViT whose trainable parameters are set as in a run; ``full_flops`` is
    :func:`count_full_flops` of the backbone for FedAvg full fine-tuning. The split step is run
    as the client and server run it: head -> body (input gradients only) -> tail and loss -> backward to the body output ->
    body backward -> head backward. FLOPs are linear in the batch, so ``batch`` only has to be >= 1.
    """
    device = next(model.parameters()).device
    size = model.vit.patch_embed.img_size
    images_BCHW = torch.zeros(batch, 3, *size, device=device)
    labels_B = torch.zeros(batch, dtype=torch.long, device=device)
    m = _Meter()
    with m("head_fwd"):
        acts_BND = model.head(images_BCHW)
    need_grad = acts_BND.requires_grad
    leaf_BND = acts_BND.detach().requires_grad_(need_grad)
    with m("body_fwd"), torch.set_grad_enabled(need_grad):
        out_BND = model.body(leaf_BND)
    if need_grad:
        with m("body_bwd"):
            (g_BND,) = torch.autograd.grad(out_BND, leaf_BND, torch.ones_like(out_BND))
    body_BND = out_BND.detach().requires_grad_(True)  # the client's copy of the body output
    with m("tail_fwd"):
        loss = F.cross_entropy(model.tail(body_BND), labels_B)
    with m("tail_bwd"):
        loss.backward()
    if need_grad:
        with m("head_bwd"):
            acts_BND.backward(g_BND)
    for name, net in (("local", model.local_forward), ("model", model)):
        with m(f"{name}_fwd"):
            loss = F.cross_entropy(net(images_BCHW), labels_B)
        if loss.requires_grad:
            with m(f"{name}_bwd"):
                loss.backward()
    counts = {k: m.counts.get(k, 0) // batch for k in PassFlops.__dataclass_fields__}
    counts["full_fwd"], counts["full_bwd"] = full_flops
    return PassFlops(**counts)


def client_round_flops(shard: int, cfg: Config, f: PassFlops) -> dict[str, int]:
    """FLOPs one client of ``shard`` samples spends in one round, per phase (the algorithm's phases)."""
    return build_algorithm(cfg).client_flops(shard, f)


def server_round_flops(shard: int, cfg: Config, f: PassFlops) -> int:
    """FLOPs the server spends on one such client in one round: body fwd (+bwd) over its kept samples."""
    return build_algorithm(cfg).server_flops(shard, f)


def fedavg_client_round_flops(shard: int, epochs: int, f: PassFlops) -> int:
    """FLOPs one FedAvg full fine-tuning client spends in one round: full fwd+bwd, ``epochs`` epochs."""
    return epochs * shard * (f.full_fwd + f.full_bwd)


def describe_plan(cfg: Config, hosts: dict[int, list[int]], world_size: int, threads: int) -> str:
    """The --dry-run report: split, parameter counts, placement, samples and bytes per round."""
    from .data.datasets import check_dataset_files

    n_train, classes = check_dataset_files(cfg.data)
    model, layout = build_meta_model(cfg, classes)
    count = part_sizes(model)
    n_clients = sum(len(c) for c in hosts.values())
    per_client = n_train // n_clients
    k = clients_per_round(n_clients, cfg.fed.fraction)
    one = client_round_bytes(per_client, cfg, tokens=model.tokens, width=model.width, flat=layout.numel,
                             need_grad=needs_grad(model, layout))
    up, down = sum(one["up"].values()), sum(one["down"].values())
    spread = sorted({len(c) for c in hosts.values()})
    algo = build_algorithm(cfg)
    kept = f", kept for split training: ~{algo.kept_count(per_client)}" if algo.split else ""
    lines = [
        f"plan: {cfg.fed.algo} on {cfg.data.dataset} ({n_train} training samples, {classes} classes), "
        f"{cfg.fed.rounds} rounds",
        f"  model {cfg.model.name}: depth {model.depth}"
        + (f", {model.tokens} tokens x {model.width} wide on the wire" if algo.split else ""),
        *algo.describe(model, count, layout.numel),
        f"  world: {world_size} rank(s), {threads} torch thread(s) each; {n_clients} clients on "
        f"{len(hosts)} client rank(s) ({'-'.join(map(str, spread))} per rank); {k} selected per round",
        f"  samples per client: ~{per_client} ({cfg.data.partition} partition){kept}",
        f"  bytes per client per round: ~{up / 1e6:.3f} MB up, ~{down / 1e6:.3f} MB down"
        + (f" ({cfg.comm.wire_dtype} on the wire)" if algo.split else "") + f"; per round in all: ~{k * (up + down) / 1e6:.3f} MB",
    ]
    if cfg.devices is not None:
        from .devices import from_record
        lines += from_record(cfg.devices, n_clients).describe()
    lines.append("dry run: config and world size are valid; nothing was trained or written")
    return "\n".join(lines)


@per_configuration("model")
def backbone_flops(cfg: Config, num_classes: int) -> tuple[int, int]:
    """:func:`count_full_flops` of the run's backbone (built on the meta device, counted where :func:`counting`
    says): the same for every algorithm."""
    from .model.vit import build_backbone
    full = build_backbone(cfg.model, num_classes, meta=True)
    with counting(full):
        return count_full_flops(full)


@per_configuration()
def run_pass_flops(cfg: Config, num_classes: int) -> PassFlops:
    """:class:`PassFlops` of the run ``cfg`` describes (its modules counted where :func:`counting` says)."""
    full_flops = backbone_flops(cfg, num_classes)
    model, _ = build_meta_model(cfg, num_classes)
    with counting(model):
        return count_pass_flops(model, full_flops)


def _saved_bytes(run) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[id(t)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@per_configuration()
def client_memory_bytes(cfg: Config, num_classes: int, batch: int) -> dict[str, int]:
    """What one client needs at mini-batch ``batch``: its part's float32 weights ('weights'), the
    trained parameters' gradients and optimiser state ('optimizer'), and the activations autograd keeps
    for one training step ('activations': the head's and the tail's graphs for split algorithms, the
    larger of that and the local-loss model's; the whole model's otherwise)."""
    model, layout = build_meta_model(cfg, num_classes)
    algo = build_algorithm(cfg)
    params = dict(model.named_parameters())
    held = model.names_in("head", "tail") if algo.split else list(params)
    per_param = 1 + (2 if cfg.fed.optimizer == "adam" else int(cfg.fed.momentum > 0))
    size = model.vit.patch_embed.img_size
    with counting(model) as device:
        images_BCHW = torch.zeros(2, 3, *size, device=device)
        if algo.split:
            grad = needs_grad(model, layout)  # the tail's input needs a gradient only when the head trains

            def split_step() -> None:
                model.head(images_BCHW)
                model.tail(torch.zeros(2, model.tokens, model.width, device=device, requires_grad=grad))
            acts = max(_saved_bytes(split_step), _saved_bytes(lambda: model.local_forward(images_BCHW)))
        else:
            acts = _saved_bytes(lambda: model(images_BCHW))
    return {"weights": FLOAT32_BYTES * sum(params[n].numel() for n in held),
            "optimizer": FLOAT32_BYTES * per_param * layout.numel,
            "activations": acts * batch // 2}


def simulated_round(cfg: Config, num_classes: int, shard: int, devices) -> "RoundTime":
    """The simulated clock's round for ``cfg`` with every selected client holding ``shard`` samples:
    the plan each client would run (its body requests by the batch sizes, the wire's bytes), through
    ``devices`` (a :class:`sfprompt_mpi.devices.Devices` with a profile per client)."""
    from .simclock import SimClock
    model, layout = build_meta_model(cfg, num_classes)
    algo = build_algorithm(cfg)
    f = run_pass_flops(cfg, num_classes)
    wire, grad = WIRE_BYTES[cfg.comm.wire_dtype], needs_grad(model, layout)
    batches = batch_sizes(algo.kept_count(shard), cfg.fed.batch_size) * cfg.fed.split_epochs if algo.split else []
    requests = [(i, b, HEADER_BYTES + b * model.tokens * model.width * wire, grad) for i, b in enumerate(batches)]
    selected = range(clients_per_round(len(devices.clients), cfg.fed.fraction))
    algo.start(model, {c: shard for c in range(len(devices.clients))})
    held = {c: algo.wire_index(1, c) for c in selected}   # the part of the vector each client holds
    one = {c: HEADER_BYTES + FLOAT32_BYTES * (layout.numel if held[c] is None else held[c].numel()) for c in selected}
    clock = SimClock(devices, algo, f, numel=layout.numel, policy=algo.server_policy())
    return clock.round({c: shard for c in selected}, {c: requests for c in selected}, one, params_bytes=one, rnd=1)
