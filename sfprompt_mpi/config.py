"""Run configuration: nested dataclasses, TOML files, CLI overrides, checks.

A config is four sections (``model``, ``data``, ``fed``, ``comm``, ``run``);
every field has a help text in its metadata and is reachable from the
command line as ``--field-name`` (field names are unique across sections).
Precedence: defaults < ``--config FILE.toml`` < CLI flags. Every check lives
in a ``__post_init__`` or in :func:`validate` and raises
:class:`~sfprompt_mpi.errors.UserError` naming the key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from .algorithms.registry import ALGOS
from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (setup.cfg installs it there)
    import tomli as tomllib

FAULTS = ("wrong-shape", "nan", "crash", "hang", "slow", "huge-norm")
AGGREGATORS = ("fedavg", "median", "trimmed-mean", "norm-clip")
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "svhn", "flowers102",
            "caltech101", "food101")
#: Names of the dtypes activations and gradients may travel in (comm.protocol maps them to torch dtypes).
WIRE_DTYPES = ("float32", "bfloat16", "float16")
T = TypeVar("T")


def per_configuration(section: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Memoise ``count(cfg, *args)`` in this process over ``cfg``'s settings (only its ``section``, where
    the count reads nothing else), its resolved devices and ``args``.

    Counting runs every op through meta kernels in Python, 0.1-0.5 s a pass; a process that prices
    several algorithms or runs (``cost``, ``table``, runs sharing an interpreter, the tests) counts each
    configuration once. Callers get a copy of the result."""
    def wrap(count: Callable[..., T]) -> Callable[..., T]:
        memo: dict[Any, T] = {}

        @functools.wraps(count)
        def once(cfg: Config, *args: Any) -> T:
            settings = getattr(cfg, section) if section else (cfg.to_dict(), cfg.devices)
            key = (repr(settings), args)
            if key not in memo:
                memo[key] = count(cfg, *args)
            return copy.copy(memo[key])
        return once
    return wrap


def clients_per_round(num_clients: int, fraction: float) -> int:
    """K, the clients selected each round: ``max(1, round(fraction * num_clients))``."""
    return max(1, round(fraction * num_clients))


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    name: str = _f("vit_micro_patch8_32", "timm VisionTransformer name, or vit_micro_patch8_32 / vit_mini_patch4_32 (small 32-px models for CPU work)")
    head_blocks: int = _f(1, "transformer blocks in the client head (after patch embedding and prompts)")
    tail_blocks: int = _f(1, "transformer blocks in the client tail (before final norm and classifier)")
    prompt_len: int = _f(8, "number of soft prompt tokens P inserted after the class token (0: no prompts)")
    prompt_depth: str = _f("shallow", "shallow: prompts at the input only; deep: fresh prompts before every head block", ("shallow", "deep"))
    train_head: bool = _f(False, "also train (and aggregate) the head's blocks and embeddings")
    pretrained: bool = _f(True, "start from pretrained weights: timm's (cached or reachable) for timm names, the shipped fractal-pretrained ones for the CPU models; --no-pretrained: random init; --checkpoint wins")
    checkpoint: str = _f("", "local weights file for the backbone (timm .pth/.bin or .safetensors)")
    adapter_dim: int = _f(8, "bottleneck width of the adapters of --algo fedpeft-adapter")
    lora_targets: str = _f("qkv,proj,fc1,fc2", "projections carrying LoRA in each LoRA block (fedlora, hetlora, legend): some of qkv, proj (attention), fc1, fc2 (MLP)")
    lora_rank: int = _f(8, "LoRA rank of --algo fedlora; the largest rank hetlora and legend give a device")
    lora_alpha: float = _f(16.0, "LoRA scale numerator: a module of rank r (the model's) adds (alpha / r) B A x")
    lora_depth: int = _f(0, "blocks carrying LoRA in --algo fedlora, counted from the output (0: every block)")
    lora_ranks: str = _f("", "per-block ranks of fedlora's LoRA blocks, input side to output, e.g. '4,8,16' (one per block of --lora-depth); empty: --lora-rank everywhere")
    lora_min_rank: int = _f(2, "smallest rank hetlora and legend give a device (ranks are powers of two times it, up to --lora-rank)")
    legend_min_depth: int = _f(1, "smallest LoRA depth legend gives a device (blocks from the output)")


@dataclass
class DataConfig:
    dataset: str = _f("digits", "dataset name", DATASETS)
    data_dir: str = _f("data", "directory holding (or receiving, with --download) the dataset files")
    download: bool = _f(False, "download the dataset into --data-dir (done once, by rank 0)")
    partition: str = _f("iid", "how training samples are split over clients", ("iid", "dirichlet", "shards"))
    alpha: float = _f(0.5, "Dirichlet concentration for --partition dirichlet (smaller: more skew)")
    shards_per_client: int = _f(2, "label-sorted shards per client for --partition shards")
    max_train_samples: int = _f(0, "use at most this many training samples (0: all)")
    max_test_samples: int = _f(0, "evaluate on at most this many test samples (0: all)")
    synthetic_samples: int = _f(512, "training samples of the synthetic dataset (test: a quarter)")
    synthetic_classes: int = _f(10, "classes of the synthetic dataset")


@dataclass
class FedConfig:
    algo: str = _f("sfprompt", "training algorithm", ALGOS)
    clients: int = _f(0, "number of federated clients N (0: one per client rank, or 4 in a single process)")
    fraction: float = _f(1.0, "fraction K/N of clients selected each round")
    rounds: int = _f(10, "federated rounds")
    local_epochs: int = _f(1, "local-loss epochs per round (head->tail, body skipped)")
    local_loss: bool = _f(True, "run the local-loss update phase")
    split_epochs: int = _f(1, "split-training epochs per round over the kept samples")
    keep_ratio: float = _f(0.5, "fraction gamma of local samples kept by EL2N pruning (1.0: no pruning)")
    batch_size: int = _f(32, "client mini-batch size")
    optimizer: str = _f("adam", "client optimiser (its state is reset every round); the paper uses sgd", ("sgd", "adam"))
    lr: float = _f(0.003, "learning rate of split training (the paper: 0.1 with sgd)")
    local_lr: float = _f(0.003, "learning rate of the local-loss update (the paper: 1e-4 with sgd)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    aggregator: str = _f("fedavg", "how the server combines client updates: fedavg, coordinate-wise median, trimmed-mean, or norm-clip (each client's delta clipped to --clip-norm)", AGGREGATORS)
    trim_fraction: float = _f(0.25, "trimmed-mean: fraction of the largest and of the smallest values dropped per coordinate")
    clip_norm: float = _f(0.0, "norm-clip: L2 bound on each client's delta from the global vector (0: this round's median delta norm)")
    dp_clip: float = _f(0.0, "client-level DP (DP-FedAvg): L2 bound on each client's delta (0: DP off)")
    dp_noise: float = _f(0.0, "client-level DP: noise multiplier z; Gaussian noise of std z * dp_clip / K is added to the mean")
    dp_delta: float = _f(1e-5, "client-level DP: the delta at which the privacy spent (epsilon) is reported")
    iterations: int = _f(10, "mergesfl: lockstep iterations per round (each client takes one step per iteration)")
    merge_features: bool = _f(True, "mergesfl: one body pass and step over all clients' activations of an "
                              "iteration (--no-merge-features: one client after the other, as sfl-full)")
    batch_regulation: bool = _f(True, "mergesfl: per-client batch sizes from the --devices profiles so that "
                                "clients finish an iteration together (without --devices: --batch-size for all)")
    selection: str = _f("kl", "mergesfl: participants by a genetic algorithm minimising the KL divergence of the "
                        "merged label mixture from the global one (kl), or drawn by the seed (random)",
                        ("kl", "random"))
    merge_weights: str = _f("batch", "mergesfl: aggregate the clients' head and tail weighted by batch size, or "
                            "uniformly", ("batch", "uniform"))
    min_batch: int = _f(4, "mergesfl: smallest regulated batch")
    max_batch: int = _f(0, "mergesfl: largest regulated batch (0: 4 x --batch-size)")
    devices: str = _f("none", "the devices the clients stand for, for the simulated clock: none, a preset "
                      "(table1: SFPrompt's 54/12 Mbit/s; jetson: 30 TX2 : 40 Xavier NX : 10 AGX Xavier) or a "
                      ".toml/.csv profile file (see docs/devices.md)")


@dataclass
class CommConfig:
    transport: str = _f("mpi", "tensor transport between ranks", ("mpi", "gloo", "nccl"))
    wire_dtype: str = _f("float32", "dtype of activations and gradients on the wire", WIRE_DTYPES)
    server_batch: int = _f(4, "max clients whose activations share one body pass (1: off)")
    server_dtype: str = _f("float32", "dtype of the server's body compute (bfloat16: autocast, for GPUs)",
                           ("float32", "bfloat16"))
    max_pending: int = _f(64, "body graphs the server keeps awaiting their gradient; beyond, it recomputes")
    client_timeout: float = _f(600.0, "seconds any rank waits for one message before giving up")
    min_clients: int = _f(1, "fewest surviving clients a round may aggregate; below it the round is retried or the run stops")
    round_retries: int = _f(0, "retries of a round that ended with fewer than --min-clients survivors, before the run stops")


@dataclass
class RunConfig:
    seed: int = _f(0, "base seed; every other seed derives from it")
    run_dir: str = _f("", "run directory (default: runs/<timestamp>)")
    resume: str = _f("", "continue the run in this directory from its last checkpoint")
    server_device: str = _f("auto", "device of the server's body", ("auto", "cpu", "cuda"))
    threads: int = _f(0, "torch threads per rank (0: cores / ranks on this node, at least 1)")
    log_level: str = _f("", "log level (default: INFO on rank 0, WARNING elsewhere)", ("", "DEBUG", "INFO", "WARNING", "ERROR"))
    dry_run: bool = _f(False, "validate config and world size, print the plan, and exit")
    reference: bool = _f(False, "without an MPI launcher, run in this one process (the reference run) instead of "
                         "starting ranks with mpiexec on every core; both end with bitwise the same parameters")
    eval_every: int = _f(1, "evaluate the global model every this many rounds (and after the last)")
    time_budget: float = _f(0.0, "seconds this process may run: no round starts that would end later "
                            "(0: the Slurm job's end time under Slurm, else none; < 0: none)")
    inject_fault: str = _f("", "for tests and drills: KIND@rank:R,round:K with KIND one of " + ", ".join(FAULTS))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    run: RunConfig = field(default_factory=RunConfig)
    #: Names of the fields set explicitly (by the TOML file or a CLI flag; on --resume: by the flags
    #: of the resuming command). Not a setting: never written to config.toml and never compared.
    given: frozenset[str] = field(default=frozenset(), compare=False)
    #: The resolved device profiles of ``fed.devices`` (:meth:`sfprompt_mpi.devices.Devices.record`), once a
    #: run resolved them: written to config.toml as its ``[devices]`` table, so --resume keeps them.
    devices: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key: value}} of the settings (``given`` is no setting)."""
        return {section: dataclasses.asdict(getattr(self, section)) for section in _SECTION_CLASSES}

    def to_toml(self) -> str:
        """Serialise as TOML (sections of scalars only, so a tiny writer does)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        if self.devices is not None:
            lines += ["[devices]", *(f"{k} = {_toml_value(v)}" for k, v in self.devices.items()), ""]
        return "\n".join(lines)


#: The extra table of a run's config.toml that holds its resolved device profiles.
DEVICES = "devices"
_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "fed": FedConfig,
                    "comm": CommConfig, "run": RunConfig}
SECTIONS = {name: cls for name, cls in _SECTION_CLASSES.items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index = {}
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


FIELDS = _field_index()
#: CLI flags that differ from their field names.
_FLAGS = {"name": "--model"}


def flag_of(name: str) -> str:
    """The command-line flag of config field ``name`` (``local_epochs`` -> ``--local-epochs``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Check a TOML value's type against the field's default type."""
    key = f"{section}.{f.name}"
    want = type(f.default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not want:
        raise UserError(f"config key {key} must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a config file into {section: {key: value}}, rejecting unknown keys and wrong types."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    out: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section == DEVICES and isinstance(values, dict):  # a run's resolved device profiles, kept as they are
            out[DEVICES] = values
            continue
        if section not in _SECTION_CLASSES:
            raise UserError(f"unknown config section [{section}] in {path} (known: {', '.join(_SECTION_CLASSES)})")
        if not isinstance(values, dict):
            raise UserError(f"config key {section} in {path} must be a [section] table")
        for key, value in values.items():
            if key not in FIELDS or FIELDS[key][0] != section:
                raise UserError(f"unknown config key {section}.{key} in {path}")
            out.setdefault(section, {})[key] = _coerce(section, FIELDS[key][1], value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The CLI: ``--config``, plus one flag per config field (default: unset)."""
    parser = argparse.ArgumentParser(
        prog="python -m sfprompt_mpi.run",
        description="SFPrompt split federated fine-tuning. Under mpirun -n W rank 0 is the server "
                    "and ranks 1..W-1 host the clients; without a launcher everything runs in one process.",
    )
    parser.add_argument("--config", default=None, help="TOML config file; CLI flags override it")
    for section, cls in _SECTION_CLASSES.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            flag = flag_of(f.name)
            meta = f.metadata
            # default None marks a flag as not given; the help states the real default (once)
            text = meta["help"] if "(default: " in meta["help"] else f"{meta['help']} (default: {f.default!r})"
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
            if isinstance(f.default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = type(f.default)
                if meta.get("choices"):
                    kwargs["choices"] = meta["choices"]
            group.add_argument(flag, **kwargs)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then CLI flags; validated. ``given``: the fields the last two set."""
    parser = build_parser()
    parser.error = _parser_error  # type: ignore[method-assign]
    return build_config(file_and_flags(parser.parse_args(argv)))


def file_and_flags(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of the ``--config`` file with the flags given in ``args`` on top."""
    values: dict[str, dict[str, Any]] = load_toml(args.config) if args.config else {}
    values.update({s: {**values.get(s, {}), **kv} for s, kv in flags_given(args).items()})
    return values


def flags_given(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of the config flags given in ``args`` (a parsed :func:`build_parser`)."""
    values: dict[str, dict[str, Any]] = {}
    for name, (section, _) in FIELDS.items():
        if getattr(args, name) is not None:
            values.setdefault(section, {})[name] = getattr(args, name)
    return values


def _parser_error(message: str) -> None:
    raise UserError(f"bad command line: {message}")


def build_config(values: dict[str, dict[str, Any]] | None = None) -> Config:
    """A validated Config from {section: {key: value}} overrides of the defaults (its ``given``)."""
    values = dict(values or {})
    devices = values.pop(DEVICES, None)
    sections = {}
    for section, cls in _SECTION_CLASSES.items():
        given = values.get(section, {})
        for key in given:
            if key not in FIELDS or FIELDS[key][0] != section:
                raise UserError(f"unknown config key {section}.{key}")
        sections[section] = cls(**given)
    if devices is not None and devices.get("spec") != sections["fed"].devices:
        devices = None  # --devices names other profiles than the saved ones: they are resolved anew
    cfg = Config(**sections, given=frozenset(k for kv in values.values() for k in kv), devices=devices)
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a saved config (e.g. from a run directory's config.toml)."""
    return build_config({**{s: {k: _coerce(s, FIELDS[k][1], v) for k, v in kv.items() if k in FIELDS}
                            for s, kv in values.items() if s in _SECTION_CLASSES},
                         **({DEVICES: values[DEVICES]} if DEVICES in values else {})})


def validate(cfg: Config) -> None:
    """Range checks that need no model or dataset; each names its key."""
    m, d, fe, c, r = cfg.model, cfg.data, cfg.fed, cfg.comm, cfg.run
    for name, (section, f) in FIELDS.items():  # the choices of a field are given once, in its metadata
        choices, value = f.metadata["choices"], getattr(getattr(cfg, section), name)
        if choices and value not in choices:
            raise UserError(f"{section}.{name} must be one of {', '.join(x or repr(x) for x in choices)}, "
                            f"got {value!r}")
    _check(m.head_blocks >= 0, "model.head_blocks must be >= 0")
    _check(m.tail_blocks >= 0, "model.tail_blocks must be >= 0")
    _check(m.prompt_len >= 0, f"model.prompt_len must be >= 0, got {m.prompt_len}")
    _check(m.adapter_dim >= 1, f"model.adapter_dim must be >= 1, got {m.adapter_dim}")
    _check_lora(m, fe)
    _check(d.alpha > 0 and math.isfinite(d.alpha), f"data.alpha must be > 0, got {d.alpha}")
    _check(d.shards_per_client >= 1, "data.shards_per_client must be >= 1")
    _check(d.max_train_samples >= 0 and d.max_test_samples >= 0, "data.max_*_samples must be >= 0")
    _check(d.synthetic_samples >= 8 and d.synthetic_classes >= 2, "data.synthetic_samples must be >= 8 and synthetic_classes >= 2")
    _check(fe.clients >= 0, f"fed.clients must be >= 0, got {fe.clients}")
    _check(0 < fe.fraction <= 1, f"fed.fraction must be in (0, 1], got {fe.fraction}")
    _check(fe.rounds >= 1, f"fed.rounds must be >= 1, got {fe.rounds}")
    _check(fe.local_epochs >= 0 and fe.split_epochs >= 0, "fed.local_epochs and fed.split_epochs must be >= 0")
    _check(0 < fe.keep_ratio <= 1, f"fed.keep_ratio must be in (0, 1], got {fe.keep_ratio}")
    _check(fe.batch_size >= 1, f"fed.batch_size must be >= 1, got {fe.batch_size}")
    _check(fe.iterations >= 1, f"fed.iterations must be >= 1, got {fe.iterations}")
    _check(fe.min_batch >= 1, f"fed.min_batch must be >= 1, got {fe.min_batch}")
    _check(fe.max_batch == 0 or fe.max_batch >= fe.min_batch,
           f"fed.max_batch must be 0 or >= fed.min_batch ({fe.min_batch}), got {fe.max_batch}")
    for key in ("lr", "local_lr", "momentum", "weight_decay"):
        value = getattr(fe, key)
        _check(math.isfinite(value) and value >= 0, f"fed.{key} must be a finite number >= 0, got {value}")
    _check(c.server_batch >= 1, f"comm.server_batch must be >= 1, got {c.server_batch}")
    _check(c.max_pending >= 1, f"comm.max_pending must be >= 1, got {c.max_pending}")
    _check(c.client_timeout > 0, f"comm.client_timeout must be > 0, got {c.client_timeout}")
    _check(r.threads >= 0, "run.threads must be >= 0")
    _check(r.eval_every >= 1, "run.eval_every must be >= 1")
    _check(0 <= fe.trim_fraction < 0.5, f"fed.trim_fraction must be in [0, 0.5), got {fe.trim_fraction}")
    for key in ("clip_norm", "dp_clip", "dp_noise"):
        value = getattr(fe, key)
        _check(math.isfinite(value) and value >= 0, f"fed.{key} must be a finite number >= 0, got {value}")
    _check(0 < fe.dp_delta < 1, f"fed.dp_delta must be in (0, 1), got {fe.dp_delta}")
    _check(fe.dp_noise == 0 or fe.dp_clip > 0, "fed.dp_noise needs fed.dp_clip > 0 (the noise is scaled to the clip bound); set --dp-clip")
    _check(fe.dp_clip == 0 or fe.aggregator == "fedavg",
           f"--dp-clip runs DP-FedAvg, which does its own clipping and averaging; drop --aggregator {fe.aggregator} or --dp-clip")
    _check(c.min_clients >= 1, f"comm.min_clients must be >= 1, got {c.min_clients}")
    _check(c.round_retries >= 0, f"comm.round_retries must be >= 0, got {c.round_retries}")
    _check(0 <= r.seed < 2**63, f"run.seed must be in [0, 2**63 - 1] (a 64-bit TOML integer >= 0), got {r.seed}")
    if r.inject_fault:
        fault = parse_fault(r.inject_fault)
        _check(1 <= fault.round <= fe.rounds,
               f"run.inject_fault round {fault.round} is not a round of this run (1..{fe.rounds})")


@dataclass(frozen=True)
class Fault:
    """A fault to inject: ``kind`` on client rank ``rank`` in round ``round``."""

    kind: str
    rank: int
    round: int


def parse_fault(spec: str) -> Fault:
    """Parse ``KIND@rank:R,round:K``."""
    try:
        kind, where = spec.split("@")
        fields = dict(part.split(":") for part in where.split(","))
        fault = Fault(kind, int(fields.pop("rank")), int(fields.pop("round")))
        if fields:
            raise ValueError
    except (ValueError, KeyError):
        raise UserError(f"run.inject_fault {spec!r} must look like KIND@rank:R,round:K") from None
    _check(fault.kind in FAULTS, f"run.inject_fault kind {fault.kind!r} is not one of {', '.join(FAULTS)}")
    _check(fault.rank >= 1, "run.inject_fault rank must be a client rank (>= 1)")
    return fault


def _check_lora(m: ModelConfig, fe: FedConfig) -> None:
    """The LoRA settings (fedlora, hetlora, legend)."""
    targets = [t.strip() for t in m.lora_targets.split(",") if t.strip()]
    _check(bool(targets) and set(targets) <= {"qkv", "proj", "fc1", "fc2"},
           f"model.lora_targets must be some of qkv,proj,fc1,fc2 (comma-separated), got {m.lora_targets!r}")
    _check(m.lora_rank >= 1, f"model.lora_rank must be >= 1, got {m.lora_rank}")
    _check(math.isfinite(m.lora_alpha) and m.lora_alpha > 0, f"model.lora_alpha must be > 0, got {m.lora_alpha}")
    _check(m.lora_depth >= 0, f"model.lora_depth must be >= 0 (0: every block), got {m.lora_depth}")
    _check(1 <= m.lora_min_rank <= m.lora_rank,
           f"model.lora_min_rank must be in 1..lora_rank ({m.lora_rank}), got {m.lora_min_rank}")
    _check(m.legend_min_depth >= 1, f"model.legend_min_depth must be >= 1, got {m.legend_min_depth}")
    try:
        ranks = [int(r) for r in m.lora_ranks.split(",")] if m.lora_ranks.strip() else []
    except ValueError:
        ranks = [0]
    _check(all(r >= 1 for r in ranks), f"model.lora_ranks must be comma-separated ranks >= 1, got {m.lora_ranks!r}")
    _check(not ranks or m.lora_depth in (0, len(ranks)),
           f"model.lora_ranks gives {len(ranks)} ranks but model.lora_depth is {m.lora_depth}; give one per LoRA block")
    if fe.algo in ("hetlora", "legend"):
        _check(fe.aggregator == "fedavg" and fe.dp_clip == 0,
               f"--algo {fe.algo} averages each LoRA position over the clients that hold it (exact FedAvg); "
               f"drop --aggregator {fe.aggregator} and --dp-clip")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)
