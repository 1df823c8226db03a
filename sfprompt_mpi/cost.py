"""Estimated cost of one round: SFPrompt against FedAvg full fine-tuning.

    python -m sfprompt_mpi.cost                                   # the default (small) model
    python -m sfprompt_mpi.cost --config configs/cifar10_vitb.toml --samples-per-client 1000
    python -m sfprompt_mpi.cost --model vit_large_patch16_224 --clients 50 --batch-size 128 \\
        --prompt-len 10 --keep-ratio 0.5 --samples-per-client 1000 --json cost.json

Takes every flag of ``python -m sfprompt_mpi.run`` (and ``--config``). Needs no
dataset files, no weights and no MPI: the model is built on the meta device.

Communication: bytes per client per round, per message kind, exactly as the
wire carries them (:mod:`sfprompt_mpi.estimate`, which a test holds
equal to what real runs measured). FedAvg full fine-tuning is priced on the
same wire: every selected client downloads and uploads all backbone
parameters as float32, one header each way. START messages (one header plus
8 bytes per client, per client rank) are left out of both.

Compute: FLOPs per sample of every pass, counted by torch's FlopCounterMode on
the real head, body and tail (matrix products only, 2 per multiply-add), then
multiplied out for one client's round: SFPrompt's local-loss epochs, EL2N
scoring and split epochs on the client and the body on the server; FedAvg's
full forward and backward for ``--fedavg-epochs`` epochs over all samples.
The configured algorithm (``--algo``) is not used: the comparison is always
SFPrompt as configured against FedAvg full fine-tuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Iterable

from .config import Config, build_config, build_parser, clients_per_round, file_and_flags
from .cli import end_process, main_guard
from .errors import UserError
from .output import write_json

#: Clients when ``--clients`` is 0, as in a single-process run.
DEFAULT_CLIENTS = 4
MB = 1e6


def build_cost_parser() -> argparse.ArgumentParser:
    """The run's parser plus this tool's own flags."""
    parser = build_parser()
    parser.prog = "python -m sfprompt_mpi.cost"
    parser.description = ("Estimate communication and compute per round of SFPrompt and of FedAvg full "
                          "fine-tuning for a model and config (no data, weights or MPI needed).")
    group = parser.add_argument_group("cost")
    group.add_argument("--samples-per-client", type=int, default=0,
                       help="local samples per client (default 0: the dataset's training set size / clients)")
    group.add_argument("--fedavg-epochs", type=int, default=0,
                       help="local epochs of FedAvg full fine-tuning per round (default 0: --local-epochs, at least 1)")
    group.add_argument("--json", default="", metavar="OUT", help="also write the numbers as JSON to OUT ('-': stdout)")
    group.add_argument("--algos", default="all", metavar="LIST",
                       help="algorithms the per-algorithm table and the run times price, comma-separated (default "
                            "all; each one is counted on its own meta model, seconds for a ViT-B, so fewer is faster)")
    group = parser.add_argument_group("run time per round (the simulated clock; also with --devices PRESET|FILE)")
    group.add_argument("--downlink-mbps", type=float, default=0.0,
                       help="every client's downlink in Mbit/s (SFPrompt's Table 1: 54); with --uplink-mbps")
    group.add_argument("--uplink-mbps", type=float, default=0.0, help="every client's uplink in Mbit/s (Table 1: 12)")
    group.add_argument("--client-tflops", type=float, default=1.3,
                       help="every client's training compute in TFLOP/s (default 1.3: a Jetson TX2's FP16 peak)")
    group.add_argument("--server-tflops", type=float, default=35.6,
                       help="the server's compute in TFLOP/s (default 35.6: an RTX 3090's FP32 peak)")
    group.add_argument("--latency-ms", type=float, default=0.0, help="latency per message in ms (default 0)")
    return parser


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    """Defaults < --config FILE < flags, as for the run; -> (config, this tool's own arguments)."""
    parser = build_cost_parser()
    parser.error = _parser_error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    cfg = build_config(file_and_flags(args))
    if args.samples_per_client < 0:
        raise UserError(f"--samples-per-client must be >= 0, got {args.samples_per_client}")
    if args.fedavg_epochs < 0:
        raise UserError(f"--fedavg-epochs must be >= 0, got {args.fedavg_epochs}")
    if (args.downlink_mbps > 0) != (args.uplink_mbps > 0):
        raise UserError("--downlink-mbps and --uplink-mbps go together (both > 0)")
    for flag in ("downlink_mbps", "uplink_mbps", "latency_ms"):
        if not getattr(args, flag) >= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag in ("client_tflops", "server_tflops"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    args.algos = _algos(args.algos)
    return cfg, args


def _algos(spec: str) -> tuple[str, ...]:
    """``--algos``: 'all' or a comma-separated list of --algo names -> those names, in ALGOS order."""
    from .config import ALGOS
    if spec.strip() == "all":
        return tuple(ALGOS)
    names = {n.strip() for n in spec.split(",") if n.strip()}
    unknown = sorted(names - set(ALGOS))
    if unknown or not names:
        raise UserError(f"--algos {spec!r}: {'unknown ' + ', '.join(unknown) if unknown else 'no algorithm'}; "
                        f"choose from all, {', '.join(ALGOS)}")
    return tuple(a for a in ALGOS if a in names)


def link_devices(args: argparse.Namespace, cfg: Config, clients: int):
    """The devices run times are priced on: every client alike from the link flags, else ``--devices``
    (None when neither is given)."""
    from .devices import Device, Devices, Server, resolve
    if args.downlink_mbps > 0:
        one = Device("client", tflops=args.client_tflops, memory_gb=math.inf, down_mbps=args.downlink_mbps,
                     up_mbps=args.uplink_mbps, latency_ms=args.latency_ms)
        return Devices(f"{args.downlink_mbps:g}/{args.uplink_mbps:g} Mbit/s", Server(tflops=args.server_tflops),
                       (one,) * clients)
    return resolve(cfg.fed.devices, clients, cfg.run.seed)


#: SFPrompt's appendix Table 1 (54 Mbit/s down, 12 up): FL, SFL and SFPrompt per-round run time, minutes.
TABLE1 = {"fl-full": ("FL", 4.091), "sfl-full": ("SFL", 4.648), "sfprompt": ("SFPrompt", 3.505)}


def run_times(cfg: Config, shard: int, classes: int, devices, algos: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per algorithm of ``algos``: the simulated round (seconds), its slowest client's compute and transfer,
    the server."""
    from .estimate import simulated_round
    out = {}
    for name in algos:
        c = dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, algo=name))
        sim = simulated_round(c, classes, shard, devices)
        slowest = max(sim.clients.values(), key=lambda t: t.finish)
        out[name] = {"round_s": sim.seconds, "compute_s": slowest.compute, "transfer_s": slowest.down + slowest.up,
                     "server_s": slowest.server}
    return out


def render_run_times(spec: str, times: dict[str, dict[str, float]]) -> str:
    lines = [f"run time per round on the simulated clock ({spec}; slowest client: compute, transfers, server)"]
    for name, t in times.items():
        paper = f"   paper's Table 1: {TABLE1[name][0]} {TABLE1[name][1]:.3f} min" if name in TABLE1 else ""
        lines.append(f"  {name:<16} {t['round_s'] / 60:9.3f} min  ({t['compute_s']:.1f} s compute, "
                     f"{t['transfer_s']:.1f} s transfers, {t['server_s']:.1f} s server){paper}")
    return "\n".join(lines)


def _parser_error(message: str) -> None:
    raise UserError(f"bad command line: {message}")


def nominal_dataset(cfg: Config) -> tuple[int, int]:
    """(training samples, classes) of the configured dataset without reading its files."""
    from .data import datasets

    name = cfg.data.dataset
    if name in datasets.NOMINAL_TRAIN_SIZES:
        n = datasets.NOMINAL_TRAIN_SIZES[name]
        classes = datasets._FILE_DATASETS[name].num_classes  # the one table of class counts
        return (min(n, cfg.data.max_train_samples) if cfg.data.max_train_samples else n), classes
    return datasets.check_dataset_files(cfg.data)  # offline datasets: no files to miss


def _model_facts(cfg: Config, model) -> dict[str, Any]:
    """The model, its cut and what travels, as the report states them."""
    m = cfg.model
    return {"model": m.name, "dataset": cfg.data.dataset, "depth": model.depth, "tokens": model.tokens,
            "width": model.width, "wire_dtype": cfg.comm.wire_dtype,
            "split": {"head_blocks": m.head_blocks, "tail_blocks": m.tail_blocks,
                      "body_blocks": model.depth - m.head_blocks - m.tail_blocks, "prompt_len": m.prompt_len,
                      "prompt_depth": m.prompt_depth, "train_head": m.train_head}}


def estimate(cfg: Config, samples_per_client: int = 0, fedavg_epochs: int = 0,
             algos: Iterable[str] | None = None) -> dict[str, Any]:
    """All the numbers, as a JSON-ready dict (bytes and FLOPs are integers)."""
    from . import estimate as acc
    from .model.vit import build_backbone

    n_train, classes = nominal_dataset(cfg)
    cfg = dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, algo="sfprompt"))  # the comparison's subject
    clients = cfg.fed.clients or DEFAULT_CLIENTS
    shard = samples_per_client or n_train // clients
    if shard < 1:
        raise UserError(f"{clients} clients share {n_train} training samples: none per client; "
                        "lower --clients or pass --samples-per-client")
    selected = clients_per_round(clients, cfg.fed.fraction)
    epochs = fedavg_epochs or max(1, cfg.fed.local_epochs)

    model, layout = acc.build_meta_model(cfg, classes)
    full = build_backbone(cfg.model, classes, meta=True)
    full_numel = sum(p.numel() for p in full.parameters())
    f = acc.run_pass_flops(cfg, classes)

    sfp_bytes = acc.client_round_bytes(shard, cfg, tokens=model.tokens, width=model.width, flat=layout.numel,
                                       need_grad=acc.needs_grad(model, layout))
    fl_bytes = acc.fedavg_client_round_bytes(full_numel)
    sfp_total = sum(sfp_bytes["up"].values()) + sum(sfp_bytes["down"].values())
    fl_total = sum(fl_bytes["up"].values()) + sum(fl_bytes["down"].values())

    client = acc.client_round_flops(shard, cfg, f)
    client_total = sum(client.values())
    fl_client = acc.fedavg_client_round_flops(shard, epochs, f)
    server = acc.server_round_flops(shard, cfg, f)
    return {
        **_model_facts(cfg, model),
        "params": {**acc.part_sizes(model), "sfprompt_exchanged": layout.numel, "fedavg_exchanged": full_numel},
        "clients": clients,
        "selected_per_round": selected,
        "samples_per_client": shard,
        "kept_per_client": acc.kept_count(shard, cfg),
        "batch_size": cfg.fed.batch_size,
        "epochs": {"local": cfg.fed.local_epochs if cfg.fed.local_loss else 0, "split": cfg.fed.split_epochs,
                   "fedavg": epochs},
        "bytes_per_client_round": {
            "sfprompt": {**sfp_bytes, "total": sfp_total},
            "fedavg_full": {**fl_bytes, "total": fl_total},
        },
        "bytes_per_round": {"sfprompt": selected * sfp_total, "fedavg_full": selected * fl_total},
        "comm_ratio": sfp_total / fl_total,
        "flops_per_sample_pass": f.as_dict(),
        "flops_per_client_round": {
            "sfprompt_client": {**client, "total": client_total},
            "sfprompt_server": server,
            "fedavg_full_client": fl_client,
        },
        "client_flops_per_sample": {"sfprompt": client_total / shard, "fedavg_full": fl_client / shard},
        "server_flops_per_sample": server / shard,
        "client_compute_percent": 100.0 * client_total / fl_client,
        "algorithms": algorithm_costs(cfg, shard, classes, algos),
    }


def algorithm_costs(cfg: Config, shard: int, classes: int,
                    algos: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """Per ``--algo`` of ``algos`` (default every one; same model, data and epochs as ``cfg``):
    parameters exchanged, bytes per client per round, and client and server FLOPs per local sample."""
    from .config import ALGOS
    from . import estimate as acc

    rows = {}
    for name in ALGOS if algos is None else algos:
        c = dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, algo=name))
        model, layout = acc.build_meta_model(c, classes)
        f = acc.run_pass_flops(c, classes)
        b = acc.client_round_bytes(shard, c, tokens=model.tokens, width=model.width, flat=layout.numel,
                                   need_grad=acc.needs_grad(model, layout))
        rows[name] = {"exchanged_params": layout.numel,
                      "bytes_per_client_round": sum(b["up"].values()) + sum(b["down"].values()),
                      "client_flops_per_sample": sum(acc.client_round_flops(shard, c, f).values()) / shard,
                      "server_flops_per_sample": acc.server_round_flops(shard, c, f) / shard}
    return rows


def render_algorithms(rows: dict[str, dict[str, float]]) -> str:
    lines = ["per algorithm (same model, data and epochs; MB per client per round, GFLOPs per local sample)",
             f"  {'algo':<16} {'exchanged':>11} {'MB/round':>10} {'client GF':>10} {'server GF':>10}"]
    for name, r in rows.items():
        lines.append(f"  {name:<16} {r['exchanged_params']:>11,} {r['bytes_per_client_round'] / MB:>10.3f} "
                     f"{r['client_flops_per_sample'] / 1e9:>10.4f} {r['server_flops_per_sample'] / 1e9:>10.4f}")
    return "\n".join(lines)


def render(r: dict[str, Any]) -> str:
    """The human-readable report of :func:`estimate`'s numbers."""
    s, p, b = r["split"], r["params"], r["bytes_per_client_round"]
    sfp, fl = b["sfprompt"], b["fedavg_full"]
    fp, fr = r["flops_per_sample_pass"], r["flops_per_client_round"]
    g = 1e9
    lines = [
        f"cost per round: SFPrompt vs FedAvg full fine-tuning, {r['model']} "
        f"(depth {r['depth']}, {r['tokens']} tokens x {r['width']} on the wire as {r['wire_dtype']})",
        f"  split      head {s['head_blocks']} block(s) + {s['prompt_len']} {s['prompt_depth']} prompts | "
        f"body {s['body_blocks']} block(s) on the server | tail {s['tail_blocks']} block(s) + norm + classifier",
        f"  parameters head {p['head'] / 1e6:.3f}M, body {p['body'] / 1e6:.3f}M, tail {p['tail'] / 1e6:.3f}M; "
        f"exchanged: SFPrompt {p['sfprompt_exchanged'] / 1e6:.3f}M, FedAvg full {p['fedavg_exchanged'] / 1e6:.3f}M",
        f"  clients    {r['clients']} ({r['selected_per_round']} per round), {r['samples_per_client']} samples each, "
        f"{r['kept_per_client']} kept for split training, batch {r['batch_size']}; epochs per round: "
        f"local-loss {r['epochs']['local']}, split {r['epochs']['split']}, FedAvg {r['epochs']['fedavg']}",
        "",
        "communication per client per round (MB = 1e6 bytes, headers included)",
        f"  {'kind':<10} {'SFPrompt up':>13} {'SFPrompt down':>14} {'FedAvg up':>11} {'FedAvg down':>12}",
    ]
    kinds = ["params", "update", "acts", "body_out", "grad_out", "grad_acts"]
    for kind in kinds:
        cells = [sfp["up"].get(kind), sfp["down"].get(kind), fl["up"].get(kind), fl["down"].get(kind)]
        if any(c is not None for c in cells):
            lines.append(f"  {kind:<10} " + " ".join(f"{_mb(c):>{w}}" for c, w in zip(cells, (13, 14, 11, 12))))
    totals = [sum(sfp["up"].values()), sum(sfp["down"].values()), sum(fl["up"].values()), sum(fl["down"].values())]
    lines.append(f"  {'total':<10} " + " ".join(f"{_mb(c):>{w}}" for c, w in zip(totals, (13, 14, 11, 12))))
    lines += [
        f"  per round, {r['selected_per_round']} clients: SFPrompt {r['bytes_per_round']['sfprompt'] / 1e9:.3f} GB, "
        f"FedAvg full {r['bytes_per_round']['fedavg_full'] / 1e9:.3f} GB",
        "",
        "compute per sample and pass (GFLOPs, forward / backward)",
    ]
    for name, what in (("head", "client"), ("body", "server, frozen"), ("tail", "client"),
                       ("local", "client, head->tail"), ("full", "FedAvg client")):
        lines.append(f"  {name:<6} {fp[name + '_fwd'] / g:10.4f} / {fp[name + '_bwd'] / g:<10.4f} ({what})")
    c = fr["sfprompt_client"]
    lines += [
        "compute per client per round (GFLOPs)",
        f"  SFPrompt client   {c['total'] / g:14.2f}  (local-loss {c['local'] / g:.2f}, EL2N {c['el2n'] / g:.2f}, "
        f"split {c['split'] / g:.2f})",
        f"  SFPrompt server   {fr['sfprompt_server'] / g:14.2f}  (body, for this client)",
        f"  FedAvg client     {fr['fedavg_full_client'] / g:14.2f}",
        "",
        f"communication SFPrompt / FedAvg full: {r['comm_ratio']:.3f}x per round "
        f"(and in total, for equal rounds)",
        f"client compute SFPrompt / FedAvg full: {r['client_compute_percent']:.3g} %",
    ]
    return "\n".join(lines) + "\n\n" + render_algorithms(r["algorithms"])


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.3f}"


def main(argv: list[str] | None = None) -> int:
    return main_guard(_main, argv)


def _main(argv: list[str] | None) -> int:
    cfg, args = parse_args(argv)
    from .lean import defer_imports, importing_for_good
    with importing_for_good():
        defer_imports()  # as the ranks do, after the argument checks: 1-1.5 s less per call
    result = estimate(cfg, args.samples_per_client, args.fedavg_epochs, args.algos)
    devices = link_devices(args, cfg, result["clients"])
    text = render(result)
    if devices is not None:
        classes = nominal_dataset(cfg)[1]
        times = run_times(cfg, result["samples_per_client"], classes, devices, args.algos)
        result["run_time"] = {"devices": devices.spec, **times}
        text += "\n\n" + render_run_times(devices.spec, times)
    print(text)
    if args.json:
        write_json(args.json, result, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    end_process(main())
