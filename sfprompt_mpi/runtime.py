"""Assembling one run on one rank: checks, data, model, transport, roles (after ``start.run_job``).

Every setup stage is agreed (``world.agree``): if any rank fails a check, every rank raises the
same UserError, so the job ends with one line and exit code 2 everywhere instead of a hang.
Nothing is written to the run directory until every check has passed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .comm.loopback import LoopbackHub
from .comm.protocol import Transport
from .comm.wrappers import Clock, wrap_transport
from .config import Config, clients_per_round, flag_of, parse_fault
from .data.datasets import FedData, build_data, check_dataset_files, prepare_dataset
from .data.partition import partition_indices
from .errors import EXIT_CONTINUE, UserError
from .fed.checkpoint import check_compatible, load_checkpoint
from .launch import REFERENCE_CLIENTS, self_launched
from .fed.client import ClientHost
from .fed.server import Server
from .estimate import describe_plan
from .fed.state import Layout
from .metrics.h5 import MetricsWriter, link_rank_files
from .algorithms import build_algorithm
from .model.split import apply_client_cut, freeze_except
from .model.vit import build_backbone
from .model.weights import check_pretrained_available
from .node import wait_policy
from .stopping import Stopper
from .world import World, agree, client_hosts, rank0_decides, set_threads, setup_logging

log = logging.getLogger("sfprompt_mpi")

def num_clients(cfg: Config, world: World) -> int:
    # a run that started its own ranks keeps the one-process default (launch.py)
    n = cfg.fed.clients or (REFERENCE_CLIENTS if world.single or self_launched() else world.size - 1)
    if not world.single and n < world.size - 1:
        raise UserError(f"--clients {n} is smaller than the {world.size - 1} client ranks; "
                        f"use --clients >= {world.size - 1} or launch {n + 1} ranks ({_ranks_flag(n + 1)})")
    if world.single and cfg.comm.transport != "mpi":
        raise UserError(f"--transport {cfg.comm.transport} carries tensors between MPI ranks but this run has one "
                        f"process; launch with mpiexec -n 2 or more, or drop --transport")
    if cfg.run.inject_fault:
        ranks = 1 if world.single else world.size - 1
        rank = parse_fault(cfg.run.inject_fault).rank
        if rank > ranks:
            raise UserError(f"--inject-fault rank {rank} is not a client rank of this run (1..{ranks}); "
                            f"pick one of them")
    k = clients_per_round(n, cfg.fed.fraction)
    if cfg.comm.min_clients > k:
        raise UserError(f"--min-clients {cfg.comm.min_clients} exceeds the {k} clients selected per round "
                        f"({n} clients x --fraction {cfg.fed.fraction}); lower --min-clients")
    return n


def _ranks_flag(ranks: int) -> str:
    """How to ask for ``ranks`` ranks from the launcher this job came from."""
    if "SLURM_JOB_ID" in os.environ:
        return f"sbatch --ntasks={ranks}, or srun -n {ranks}"
    return f"mpiexec -n {ranks}"


def _new_run_dir(cfg: Config) -> Path:
    path = Path(cfg.run.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"run directory {path} already exists and is not empty; "
                        f"choose another --run-dir or continue it with --resume {path}")
    parent = path.parent if path.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"run directory {path} cannot be created: {probe} is a file; choose another --run-dir")
    try:  # os.access says yes to root even on a read-only file system: try for real, leave nothing behind
        os.rmdir(tempfile.mkdtemp(prefix=".sfprompt-probe-", dir=probe))
    except OSError as exc:
        raise UserError(f"run directory {path} cannot be created: {probe} is not writable "
                        f"({exc.strerror}); choose another --run-dir") from None
    return path


def _rank0_checks(cfg: Config, world: World) -> dict:
    """Checks that touch the file system once: weights, dataset files, run dir, checkpoint."""
    n = num_clients(cfg, world)
    _server_device(cfg)  # a missing GPU is refused before anything is written or logged as started
    meta_vit = build_backbone(cfg.model, num_classes=2, meta=True)
    depth = len(meta_vit.blocks)
    if cfg.model.head_blocks + cfg.model.tail_blocks >= depth:
        raise UserError(f"head_blocks + tail_blocks = {cfg.model.head_blocks + cfg.model.tail_blocks} must be "
                        f"smaller than the depth {depth} of {cfg.model.name}")
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise UserError(f"model checkpoint {cfg.model.checkpoint} does not exist")
    if cfg.model.pretrained and not cfg.model.checkpoint:
        check_pretrained_available(cfg.model.name)  # seconds, not minutes of download retries
    if cfg.run.dry_run:
        return {"clients": n, "devices": device_profiles(cfg, n, check_dataset_files(cfg.data)[1])}
    prepare_dataset(cfg.data)
    if cfg.model.pretrained:
        build_backbone(cfg.model, num_classes=2)  # fetch into the cache once, before the other ranks
    info: dict[str, Any] = {"clients": n, "start_round": 1, "resume_round": None,
                            "devices": device_profiles(cfg, n, check_dataset_files(cfg.data)[1])}
    if cfg.run.resume:
        run_dir = Path(cfg.run.resume)
        done = 0  # a run stopped (or killed) before its first checkpoint starts afresh in its own directory
        if (run_dir / "checkpoint").exists() or not (run_dir / "config.toml").is_file():
            done = int(load_checkpoint(run_dir / "checkpoint")[1]["round"])
        info.update(run_dir=str(run_dir), start_round=done + 1, resume_round=done)
    else:
        info["run_dir"] = str(_new_run_dir(cfg))
    return info


def device_profiles(cfg: Config, n: int, classes: int) -> dict[str, Any] | None:
    """The ``[devices]`` record of ``n`` clients: the run's saved one, else ``--devices`` resolved; every
    client's memory is checked (unless the algorithm adapts to it)."""
    from .devices import from_record, resolve
    devices = from_record(cfg.devices, n) if cfg.devices is not None else resolve(cfg.fed.devices, n, cfg.run.seed)
    if devices is None:
        return None
    algo = build_algorithm(cfg)
    if algo.adapts_to_memory:
        algo.check_devices(devices, classes)
    else:
        from .estimate import client_memory_bytes
        needs: dict[int, int] = {}
        for cid, device in enumerate(devices.clients):
            batch = algo.client_settings(1, cid).batch_size
            if batch not in needs:
                needs[batch] = sum(client_memory_bytes(cfg, classes, batch).values())
            if needs[batch] > device.memory_gb * 1e9:
                raise UserError(f"--devices {devices.spec}: client {cid} ({device.name}, {device.memory_gb:g} GB) "
                                f"cannot hold its part of {cfg.model.name}, its optimiser state and the activations "
                                f"of a batch of {batch} ({needs[batch] / 1e9:.3g} GB); lower --batch-size or give it "
                                f"more memory_gb")
    return devices.record()


def run_rank(cfg: Config, world: World, started: float, clock: Clock | None, stopper: Stopper, note: str) -> int:
    """:func:`sfprompt_mpi.start.run_job` on, once the rank is started: the agreed checks, the dry run's plan
    (rank 0), then data, model and the run."""
    if world.rank == 0:
        _warn_ignored(cfg)
    info = rank0_decides(world, lambda: _rank0_checks(cfg, world) if world.rank == 0 else None)
    n = info["clients"]
    if info["devices"] is not None:
        cfg = dataclasses.replace(cfg, devices=info["devices"])
    threads = set_threads(cfg, world, n)
    hosts = {1: list(range(n))} if world.single else client_hosts(n, world.size)
    if cfg.run.dry_run:
        if world.rank == 0:
            if note:
                log.info("%s", note)
            print(describe_plan(cfg, hosts, world.size, threads))
        return 0
    start, resume_round, run_dir = info["start_round"], info["resume_round"], Path(info["run_dir"])
    if start > cfg.fed.rounds:
        log.info("run %s already completed %d of %d rounds; nothing to do", run_dir, start - 1, cfg.fed.rounds)
        return 0

    data: FedData = agree(world, lambda: build_data(cfg.data, _image_size(cfg), cfg.run.seed))
    algo = build_algorithm(cfg)
    model = agree(world, lambda: algo.build_model(data.num_classes, quiet=world.rank != 0))
    layout = Layout(model, algo.trained_names(model))
    freeze_except(model, set(layout.names))
    global_state = agree(world, lambda: _load_global(cfg, layout, model) if world.rank == 0 and resume_round else None)

    if world.rank == 0:
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        if not cfg.run.resume:
            (run_dir / "config.toml").write_text(cfg.to_toml())
    if world.comm is not None and world.size > 1:
        world.comm.Barrier()
    setup_logging(cfg, world.rank, run_dir / "logs")
    if resume_round is not None:
        log.info("resuming %s after round %d", run_dir, resume_round)

    release_free_memory()
    if world.comm is not None and world.size > 1:
        world.comm.Barrier()
    node = world.node
    log.info("setup took %.1f s on %d rank(s) (imports, data, model, checks); rank 0's node: %d rank(s) on %d CPU(s), "
             "%d torch thread(s) each, %s%s", time.monotonic() - started, world.size, node.local_size, node.cpus,
             threads, wait_policy(node), f"; {note}" if note else "")
    if world.single:
        server, _ = run_reference(cfg, model, layout, data, hosts, run_dir, global_state, start, resume_round,
                                  clock=clock, stopper=stopper)
        stopped = server.stopped
    else:
        stopped = _run_mpi(cfg, world, model, layout, data, hosts, run_dir, global_state, start, resume_round,
                           clock, stopper)
    return EXIT_CONTINUE if stopped is not None else 0


def _wrap(cfg: Config, raw: Transport, clock: Clock | None = None) -> Transport:
    """What roles get: ``raw`` counted, timed into ``clock`` if any, with ``--inject-fault`` on its rank."""
    fault = parse_fault(cfg.run.inject_fault) if cfg.run.inject_fault else None
    return wrap_transport(raw, fault=fault, timeout=cfg.comm.client_timeout, clock=clock)


def _warn_ignored(cfg: Config) -> None:
    """One warning line for the settings given explicitly that the run's algorithm does not read."""
    ignored = build_algorithm(cfg).ignored(cfg.given)
    if ignored:
        log.warning("warning: --algo %s does not read %s; %s", cfg.fed.algo, ", ".join(flag_of(n) for n in ignored),
                    "it is ignored" if len(ignored) == 1 else "they are ignored")


def release_free_memory() -> None:
    """Hand freed heap back to the OS after setup: with 51 ranks on one node,
    every few MB per rank counts. A no-op where the C library has no malloc_trim."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _image_size(cfg: Config) -> int:
    return build_backbone(cfg.model, num_classes=2, meta=True).patch_embed.img_size[0]


def _load_global(cfg: Config, layout: Layout, model) -> dict[str, torch.Tensor]:
    where = Path(cfg.run.resume) / "checkpoint"
    server_trained = set(build_algorithm(cfg).server_trained_names(model))
    tensors, _ = load_checkpoint(where)
    expected = dict(zip(layout.names, layout.shapes))
    expected.update({n: tuple(p.shape) for n, p in model.named_parameters() if n in server_trained})
    check_compatible(tensors, expected, str(where))
    return tensors


def _attrs(cfg: Config, device: str) -> dict[str, Any]:
    import timm
    versions = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}
    try:
        import mpi4py
        from mpi4py import MPI
        versions.update(mpi4py=mpi4py.__version__, mpi=MPI.Get_library_version().splitlines()[0].strip())
    except Exception:  # noqa: BLE001 - versions are informational
        pass
    return {"config": cfg.to_toml(), "versions": json.dumps(versions), "host": socket.gethostname(), "device": device}


def _server_device(cfg: Config) -> torch.device:
    if cfg.run.server_device == "cuda" or (cfg.run.server_device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--server-device cuda but no CUDA device is visible on rank 0")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _progress(cfg: Config) -> Callable[[int, dict], None]:
    """Per-round report on rank 0: a tqdm bar on a terminal, else one log line per round."""
    import sys
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=cfg.fed.rounds, desc="rounds", unit="round", leave=True)
    moved_total = 0.0

    def report(rnd: int, row: dict) -> None:
        nonlocal moved_total
        moved = sum(v for k, v in row.items() if k.startswith("bytes_sent/") or k.startswith("bytes_recv/")) / 1e6
        moved_total += moved
        acc = f"test acc {row['test_acc']:.4f} loss {row['test_loss']:.4f}" if "test_acc" in row else "no eval"
        if bar is not None:
            bar.n = rnd
            bar.set_postfix_str(f"acc {row.get('test_acc', float('nan')):.4f}, {moved_total:.1f} MB")
            bar.refresh()
            if rnd == cfg.fed.rounds:
                bar.close()
        logging.getLogger("sfprompt_mpi.progress").log(
            logging.DEBUG if bar is not None else logging.INFO,
            "round %d/%d: %s (%.1f s, %.2f MB at the server)", rnd, cfg.fed.rounds, acc, row["round_s"], moved)
    return report


def _build_server(cfg, model, layout, data, hosts, transport, run_dir, global_state, resume_round, device,
                  stopper=None):
    if cfg.run.server_device == "auto" and device.type == "cpu":
        gpus = os.environ.get("SLURM_JOB_GPUS") or os.environ.get("SLURM_STEP_GPUS")
        log.log(logging.WARNING if gpus else logging.INFO, "the server's body runs on the CPU: no CUDA device is "
                "usable on rank 0%s (--server-device auto; cuda makes this an error)",
                f" although Slurm allocated GPU(s) {gpus}" if gpus else "")
    metrics = MetricsWriter(run_dir, 0, role="server", attrs=_attrs(cfg, str(device)), resume_round=resume_round)
    n = sum(len(c) for c in hosts.values())
    parts = _partition(cfg, data, n)
    label_counts = np.stack([np.bincount(data.train_labels[p], minlength=data.num_classes) for p in parts])
    if self_launched():  # one client per body pass, as in the one-process run it computes (launch.py)
        cfg = dataclasses.replace(cfg, comm=dataclasses.replace(cfg.comm, server_batch=1))
    algo = build_algorithm(cfg)
    algo.start(model, {c: len(p) for c, p in enumerate(parts)})
    server = Server(cfg, model, layout, data.test, hosts, transport, algorithm=algo, device=device,
                    metrics=metrics, run_dir=str(run_dir), on_round=_progress(cfg), stopper=stopper,
                    label_counts=label_counts)
    if global_state is not None:
        server.load_state(global_state)
    return server, metrics


def _build_host(cfg, rank, model, layout, data, hosts, transport, run_dir, resume_round):
    parts = _partition(cfg, data, sum(len(c) for c in hosts.values()))
    shards = {c: parts[c] for c in hosts[rank]}
    metrics = MetricsWriter(run_dir, rank, role="client", attrs=_attrs(cfg, "cpu"), resume_round=resume_round)
    algo = build_algorithm(cfg)
    algo.start(model, {c: len(p) for c, p in enumerate(parts)})
    client_model = apply_client_cut(model) if algo.split else model
    return ClientHost(cfg, algo, client_model, layout, data.train, shards, transport, metrics), metrics


def _partition(cfg: Config, data: FedData, n: int) -> list[np.ndarray]:
    """The training-set indices of each of the ``n`` clients."""
    return partition_indices(data.train_labels, n, cfg.data.partition, alpha=cfg.data.alpha,
                             shards_per_client=cfg.data.shards_per_client, seed=cfg.run.seed)


def run_reference(cfg, model, layout, data, hosts, run_dir, global_state=None, start=1,
                  resume_round=None, clock: Clock | None = None,
                  stopper: Stopper | None = None) -> tuple[Server, ClientHost]:
    """Server and one client host as two threads over the loopback transport; -> both, finished
    (or stopped early: ``server.stopped``).

    ``clock`` (optional) times the server's end of the transport; ``stopper`` asks it to stop early."""
    import copy
    hub = LoopbackHub(2)
    device = _server_device(cfg)
    host, host_metrics = _build_host(cfg, 1, copy.deepcopy(model), layout, data, hosts, _wrap(cfg, hub.endpoint(1)),
                                     run_dir, resume_round)
    server, metrics = _build_server(cfg, model, layout, data, hosts, _wrap(cfg, hub.endpoint(0), clock), run_dir,
                                    global_state, resume_round, device, stopper)
    failures: list[BaseException] = []

    def host_main() -> None:
        try:
            host.serve()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)
            hub.abort(f"client host: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=host_main, name="r01", daemon=True)
    thread.start()
    try:
        server.run(start)
    except BaseException:
        hub.abort("the server failed")
        if failures:
            raise failures[0] from None
        raise
    finally:
        thread.join(timeout=60)
        metrics.close()
        host_metrics.close()
        link_rank_files(run_dir, 2)
    if failures:
        raise failures[0]
    _summary(cfg, server, run_dir)
    return server, host


def _run_mpi(cfg, world, model, layout, data, hosts, run_dir, global_state, start, resume_round,
             clock: Clock | None = None, stopper: Stopper | None = None) -> tuple[int, str] | None:
    """This rank's part of the MPI run; -> on every rank, where and why the run stopped early, or None."""
    from .comm import build_transport
    device = _server_device(cfg) if world.rank == 0 else torch.device("cpu")
    raw = agree(world, lambda: build_transport(cfg.comm.transport, world.comm, device, world.node))
    transport = _wrap(cfg, raw, clock)
    try:
        if world.rank == 0:
            server, metrics = _build_server(cfg, model, layout, data, hosts, transport, run_dir, global_state,
                                            resume_round, device, stopper)
            try:
                server.run(start)
            finally:
                metrics.close()
            link_rank_files(run_dir, world.size)
            _summary(cfg, server, run_dir)
            stopped = server.stopped
        else:
            host, metrics = _build_host(cfg, world.rank, model, layout, data, hosts, transport, run_dir, resume_round)
            try:
                host.serve()
            finally:
                metrics.close()
            stopped = None
    finally:
        transport.close()
    # Every rank learns the outcome from rank 0, after rank 0 has written everything: all exit alike.
    stopped = world.comm.bcast(stopped, root=0)
    if stopped is not None and stopper is not None:
        # srun --kill-on-bad-exit sends SIGTERM to the ranks still running once one exits 4: from here
        # each keeps its handler (Stopper.close), and none leaves before every rank has got that far
        stopper.request(f"stopped after round {stopped[0]}")
        world.comm.Barrier()
    return stopped


def _summary(cfg: Config, server: Server, run_dir: Path) -> None:
    if server.stopped is not None:
        done, why = server.stopped
        sys.stderr.write(f"[r00] stopped after round {done} of {cfg.fed.rounds} ({why}); the checkpoint holds "
                         f"round {done}. The same command continues it (--run-dir {run_dir}), as does "
                         f"--resume {run_dir}; a job script requeues itself on exit code {EXIT_CONTINUE}\n")
        sys.stderr.flush()
        return
    last = next((h for h in reversed(server.history) if "test_acc" in h), None)
    acc = f"{last['test_acc']:.4f}" if last else "n/a"
    log.info("done: %d rounds, final test accuracy %s; run directory %s", cfg.fed.rounds, acc, run_dir)
    log.info("analyze with: python -m sfprompt_mpi.analyze %s", run_dir)
