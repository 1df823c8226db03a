"""The one interface every federated algorithm implements.

An :class:`Algorithm` holds exactly what differs between algorithms; the
runtime (transport, server round, client host, checkpoints, metrics, cost
accounting) is shared and never asks for an algorithm by name:

- **the model**: soft prompts it carries (:meth:`~Algorithm.prompt_len`),
  what it adds (:meth:`~Algorithm.adapt_model`: adapters, later LoRA),
- **what trains and travels**: :meth:`~Algorithm.trained_names` (clients
  train them, the server aggregates them as one flat vector) and
  :meth:`~Algorithm.server_trained_names` (the server trains them itself),
- **the per-client settings of a round**: :meth:`~Algorithm.client_settings`
  (batch size and learning rate today; per-device values later),
- **the client's round**: :meth:`~Algorithm.client_round`, its phases,
  written as local training over a :class:`ClientRound`; split algorithms
  reach the server's body through ``ctx.remote_body``,
- **what the server does with activations**: :meth:`~Algorithm.server_body`
  (a frozen body served in any order and batched, or a body it trains),
- **what each client holds of the vector**: :meth:`~Algorithm.wire_index` (all of it, or a part
  per client and round: LoRA of per-device ranks and depths), with :meth:`~Algorithm.start`
  telling the algorithm the model and every client's sample count on each role,
- **how updates are aggregated**: :meth:`~Algorithm.streams` and
  :meth:`~Algorithm.aggregate` (updates of different shapes override both),
- **what it costs**: :meth:`~Algorithm.kept_count`,
  :meth:`~Algorithm.client_flops`, :meth:`~Algorithm.server_flops`, read by
  the analytic cost model, and :meth:`~Algorithm.describe` for ``--dry-run``.

Settings: :data:`ALGORITHM_SETTINGS` are the config fields that only some
algorithms read; each algorithm names those it reads in ``reads``, and a
run warns once about any other of them given explicitly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from ..fed.aggregate import Updates, aggregate
from ..fed.body import FrozenBody
from ..fed.dp import dp_epsilon, dp_fedavg
from ..fed.state import select_clients

if TYPE_CHECKING:
    from ..config import Config
    from ..fed.training import LocalTrainer
    from ..model.split import PromptedViT

#: Config fields that belong to some algorithms only (the rest apply to every run).
ALGORITHM_SETTINGS = ("prompt_len", "prompt_depth", "train_head", "adapter_dim", "lora_targets", "lora_rank",
                      "lora_alpha", "lora_depth", "lora_ranks", "lora_min_rank", "legend_min_depth", "local_loss",
                      "local_epochs", "local_lr", "keep_ratio", "server_batch", "max_pending", "server_dtype",
                      "wire_dtype", "iterations", "merge_features", "batch_regulation", "selection", "merge_weights",
                      "min_batch", "max_batch")
#: What split algorithms read of the server's serving settings.
SPLIT_SETTINGS = frozenset({"server_batch", "max_pending", "server_dtype", "wire_dtype"})
_CLASSIFIER = "vit.head."  # timm's classifier; fc_norm and the final norm belong to the tail


@dataclass(frozen=True)
class ClientSettings:
    """What one client uses in one round (the place for per-device values)."""

    batch_size: int
    lr: float


@dataclass(frozen=True)
class ClientsView:
    """What the server knows of the clients before the first round (:meth:`Algorithm.observe_clients`)."""

    label_counts_NC: np.ndarray | None = None   # clients x classes: each client's label histogram
    devices: Any = None                         # the resolved sfprompt_mpi.devices.Devices, or None
    pass_flops: Any = None                      # the run's PassFlops (with devices)
    sample_bytes: int = 0                       # one sample's activations on the wire


@dataclass
class ClientRound:
    """Everything one client's round works with.

    ``train(forward, indices, epochs, lr)`` runs plain local training of the
    model's trainable parameters (-> mean loss, accuracy); ``remote_body`` is
    the server's body as an autograd function (split algorithms only), so
    split training is ``train(lambda x: model.tail(remote_body(model.head(x))), ...)``.
    """

    model: "PromptedViT"
    shard: np.ndarray                      # indices of the client's samples in the training set
    settings: ClientSettings
    trainer: "LocalTrainer"
    generator: torch.Generator             # seeded by (seed, round, client): batch order
    remote_body: Callable[[torch.Tensor], torch.Tensor] | None = None
    round: int = 0                         # the round and the client this is
    cid: int = 0

    def train(self, forward: Callable[[torch.Tensor], torch.Tensor], indices: np.ndarray, epochs: int,
              lr: float) -> tuple[float, float]:
        return self.trainer.train(forward, indices, self.generator, epochs=epochs, lr=lr,
                                  batch_size=self.settings.batch_size)

    def split_forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Head here, body on the server, tail here -> ``logits_BK``."""
        return self.model.tail(self.remote_body(self.model.head(images_BCHW)))

    def split_train(self, indices: np.ndarray, epochs: int, lr: float) -> dict[str, float]:
        """Split training over ``indices``; -> ``split_loss``, ``time/split`` (computing) and ``time/wait``
        (waiting for the server's replies)."""
        t0 = time.perf_counter()
        loss, _ = self.train(self.split_forward, indices, epochs, lr)
        waited = self.remote_body.waited
        return {"split_loss": loss, "time/split": time.perf_counter() - t0 - waited, "time/wait": waited}


class Algorithm:
    """One federated algorithm; subclasses set the class attributes and the abstract parts."""

    name: ClassVar[str]
    #: Head and tail on the client, body on the server (activations travel); else the whole model on the client.
    split: ClassVar[bool] = False
    #: The model carries ``model.prompt_len`` soft prompts.
    prompts: ClassVar[bool] = False
    #: Which of ALGORITHM_SETTINGS this algorithm reads.
    reads: ClassVar[frozenset[str]] = frozenset()
    #: What clients train and exchange, in words (tables, ``--dry-run``).
    trains: ClassVar[str] = ""
    #: The algorithm fits each client's work to its device's memory (else a client whose ``--devices``
    #: memory cannot hold its part of the model and a batch is refused at setup).
    adapts_to_memory: ClassVar[bool] = False

    def __init__(self, cfg: "Config") -> None:
        self.cfg = cfg

    def ignored(self, given: "Iterable[str]") -> list[str]:
        """The algorithm-specific settings among ``given`` (fields set explicitly) that this algorithm does not read."""
        given = set(given)
        return [n for n in ALGORITHM_SETTINGS if n in given and n not in self.reads]

    # -- the model ---------------------------------------------------------------
    def prompt_len(self) -> int:
        """Soft prompt tokens the model of this run carries."""
        return self.cfg.model.prompt_len if self.prompts else 0

    def adapt_model(self, model: "PromptedViT") -> None:
        """Add what the algorithm adds to the backbone (adapters, ...), names of timm's untouched. In place."""

    def build_model(self, num_classes: int, *, quiet: bool = False, meta: bool = False) -> "PromptedViT":
        """The model this run trains: the backbone with the algorithm's prompts and additions."""
        from ..model.split import build_model
        adapt = self.adapt_model if type(self).adapt_model is not Algorithm.adapt_model else None
        return build_model(self.cfg.model, num_classes, self.cfg.run.seed, quiet=quiet, prompt_len=self.prompt_len(),
                           adapt=adapt, meta=meta)

    def trained_names(self, model: "PromptedViT") -> list[str]:
        """Parameters clients train and the server aggregates, in model order."""
        raise NotImplementedError

    def server_trained_names(self, model: "PromptedViT") -> list[str]:
        """Parameters the server trains itself (checkpointed beside the global vector)."""
        return []

    def start(self, model: "PromptedViT", shards: dict[int, int]) -> None:
        """Called on the server and on every client host before the first round, with the run's model and
        every client's sample count (id -> samples): what per-client choices may depend on besides the
        config, the seed, the round and the device profiles (``cfg.devices``), so both ends make the same."""

    def wire_index(self, rnd: int, cid: int) -> torch.Tensor | None:
        """Positions of the flat vector client ``cid`` holds in round ``rnd``, or None: all of it.

        The server sends only these values and the client returns only these; on the client the
        others are zero, and aggregation averages each position over the clients that hold it
        (:meth:`Updates.mean`). Both ends call it, so it must be a function of what both know."""
        return None

    def check_devices(self, devices: Any, num_classes: int) -> None:
        """For algorithms that adapt to memory: refuse (UserError) at setup a device nothing fits."""

    # -- a round -------------------------------------------------------------------
    def observe_clients(self, view: ClientsView) -> None:
        """What the server knows of the clients before the first round (their label histograms, devices),
        for algorithms that select or size by it. Called on the server only."""

    def select_clients(self, rnd: int, num_clients: int) -> list[int]:
        """The clients of round ``rnd``, ascending: ``--fraction`` of them, drawn by the seed (server only)."""
        return select_clients(num_clients, self.cfg.fed.fraction, self.cfg.run.seed, rnd)

    def client_settings(self, rnd: int, cid: int) -> ClientSettings:
        """Client ``cid``'s settings in round ``rnd``, after :meth:`select_clients` chose it; the server sends
        the batch size with the parameters (it is the authority) and checks the client's messages against it."""
        return ClientSettings(batch_size=self.cfg.fed.batch_size, lr=self.cfg.fed.lr)

    def lockstep(self) -> bool:
        """Whether a host runs its clients together, one step of each in turn (:meth:`client_rounds`)."""
        return False

    def client_rounds(self, ctxs: dict[int, ClientRound]) -> dict[int, dict[str, float]]:
        """The rounds of one host's clients in lockstep (each ``ctx`` on its own model); -> stats of those that
        stayed in the round. Only for algorithms whose :meth:`lockstep` is true."""
        raise NotImplementedError

    def aggregation_weight(self, shard: int, settings: ClientSettings) -> int:
        """A client's weight in the aggregation, sent with its update: its sample count."""
        return shard

    def client_round(self, ctx: ClientRound) -> dict[str, float]:
        """Train one client from the global parameters already in ``ctx.model``; -> its stats.

        Stats keys become ``clients/<id>/<key>`` in the host's HDF5 file;
        ``kept`` (samples trained on) and ``time/<phase>`` are expected.
        """
        raise NotImplementedError

    def server_body(self, model: "PromptedViT", device: torch.device) -> FrozenBody:
        """What the server does with activations: here a frozen body, served in any order and batched."""
        return FrozenBody(model, device, bf16=self.cfg.comm.server_dtype == "bfloat16")

    def server_policy(self) -> str:
        """How the server serves this algorithm's requests (its body's ``policy``; the simulated clock's)."""
        return FrozenBody.policy

    # -- aggregation ------------------------------------------------------------------
    def streams(self) -> bool:
        """Whether updates are summed exactly on arrival (plain FedAvg) rather than kept until the end."""
        return self.cfg.fed.aggregator == "fedavg" and self.cfg.fed.dp_clip <= 0

    def aggregate(self, rnd: int, global_F: torch.Tensor, updates: Updates, *, selected: int,
                  num_clients: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The new global vector from the surviving updates by ``--aggregator``, or DP-FedAvg."""
        fed = self.cfg.fed
        if updates.sum is not None:
            return updates.mean(global_F), {}
        pairs = updates.in_order()
        if fed.dp_clip > 0:
            new_F, stats = dp_fedavg(global_F, [u for u, _ in pairs], clip=fed.dp_clip, noise=fed.dp_noise,
                                     selected=selected, seed=self.cfg.run.seed, rnd=rnd)
            stats["dp_epsilon"] = dp_epsilon(rnd, noise=fed.dp_noise, sample_rate=selected / num_clients,
                                             delta=fed.dp_delta)
            return new_F, stats
        return aggregate(fed.aggregator, global_F, pairs, trim=fed.trim_fraction, clip=fed.clip_norm)

    # -- cost ------------------------------------------------------------------------
    def kept_count(self, shard: int) -> int:
        """Samples of a ``shard``-sample client that split training uses."""
        return shard

    def client_flops(self, shard: int, f: Any) -> dict[str, int]:
        """FLOPs one client of ``shard`` samples spends in one round, per phase (``f``: the FLOPs per
        sample of every pass, an :class:`sfprompt_mpi.estimate.PassFlops`, which prices any algorithm).

        Split: 'split' (head and tail fwd+bwd over the kept samples); whole-model
        algorithms: 'train' (``split_epochs`` epochs, the model's own trainable set)."""
        epochs = self.cfg.fed.split_epochs
        if not self.split:
            return {"train": epochs * shard * (f.model_fwd + f.model_bwd)}
        return {"split": epochs * self.kept_count(shard) * (f.head_fwd + f.head_bwd + f.tail_fwd + f.tail_bwd)}

    def round_flops(self, rnd: int, cid: int, shard: int, f: Any) -> dict[str, int]:
        """:meth:`client_flops` of client ``cid`` in round ``rnd`` (per-client work: what the clock prices)."""
        return self.client_flops(shard, f)

    def server_flops(self, shard: int, f: Any) -> int:
        """FLOPs the server spends on one such client in one round: body fwd (+bwd) over its kept samples."""
        if not self.split:
            return 0
        return self.cfg.fed.split_epochs * self.kept_count(shard) * (f.body_fwd + f.body_bwd)

    def describe(self, model: "PromptedViT", counts: dict[str, int], trained: int) -> list[str]:
        """The ``--dry-run`` lines on where the model lives and what trains (``counts``: parameters per part)."""
        m = self.cfg.model
        if not self.split:
            return [f"  whole model on every client: {sum(counts.values()):,} parameters; the server "
                    f"aggregates and evaluates only",
                    f"  trainable and exchanged: {trained:,} parameters ({self.trains})"]
        body = "trained by the server" if self.server_trained_names(model) else "frozen"
        prompts = f" + {self.prompt_len()} {m.prompt_depth} prompts" if self.prompt_len() else ""
        return [f"  head  {m.head_blocks} blocks{prompts}: {counts['head']:,} parameters (client)",
                f"  body  {model.depth - m.head_blocks - m.tail_blocks} blocks: {counts['body']:,} "
                f"parameters (server, {body})",
                f"  tail  {m.tail_blocks} blocks + norm + classifier: {counts['tail']:,} parameters (client)",
                f"  trainable and exchanged: {trained:,} parameters ({self.trains})"]


def classifier_names(model: torch.nn.Module) -> list[str]:
    """timm's classifier (``vit.head.*``); fc_norm and the final norm belong to the tail."""
    return [n for n, _ in model.named_parameters() if n.startswith(_CLASSIFIER)]


def in_model_order(model: torch.nn.Module, names: Any) -> list[str]:
    """``names`` (any collection) in the model's parameter order."""
    wanted = set(names)
    return [n for n, _ in model.named_parameters() if n in wanted]


def timed(stats: dict[str, float], key: str):
    """``with timed(stats, 'time/local'): ...`` adds the seconds spent inside to ``stats[key]``."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        t0 = time.perf_counter()
        try:
            yield
        finally:
            stats[key] = stats.get(key, 0.0) + time.perf_counter() - t0
    return scope()
