"""``server`` suite: body throughput while serving K clients, against the body alone.

The project's :class:`~sfprompt_mpi.fed.server.Server` runs whole rounds
(``run_round``: parameters out, serving with batching, validation, FedAvg)
against :class:`ScriptedClients`, a Transport that plays K clients answering
instantly from pre-made tensors. So the measurement is the server's own cost
(message checks, concatenation, device copies, batching decisions and the
body's forward and backward) with no client compute and no network in it.
The limit is the same body's forward plus backward to its input
(``torch.autograd.grad``, exactly what the server computes) at its best batch
size, measured in the same process between the serving trials.

Throughput counts samples through the body per second of wall time.
"""

from __future__ import annotations

import argparse
import functools
import collections
import time

from ..errors import UserError
from .common import Report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_micro_patch8_32", help="model name (as --model of the run)")
    p.add_argument("--clients", type=int, default=8, help="K clients served per round")
    p.add_argument("--server-batch", type=int, default=4, help="clients per body pass (--server-batch of the run)")
    p.add_argument("--batch-size", type=int, default=32, help="client mini-batch size B")
    p.add_argument("--steps", type=int, default=4, help="split-training steps per client per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per trial (after one warm-up round)")
    p.add_argument("--trials", type=int, default=3, help="alternating baseline/serving trials (best kept)")
    p.add_argument("--device", default="cpu", help="server device: cpu, cuda, cuda:0 ...")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--server-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the body's compute dtype in both measurements (--server-dtype of the run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores; more than one is slower "
                   "on a shared or oversubscribed CPU)")


class ScriptedClients:
    """A Transport (rank 0's end) whose K clients answer the server at once.

    After a client's PARAMS it sends ACTS for step 0; each BODY_OUT is answered
    with GRAD_OUT, each GRAD_ACTS with the next ACTS or, after the last step,
    the UPDATE. Messages queue in arrival order, so the server batches what
    has "arrived" just as it does with real clients.
    """

    def __init__(self, acts_BND: dict, grads_BND: dict, steps: int, samples: int) -> None:
        self.rank, self.size = 0, 2
        self.on_header = None
        self.acts, self.grads, self.steps, self.samples = acts_BND, grads_BND, steps, samples
        self.inbox: collections.deque = collections.deque()

    def _queue(self, kind, tensor, *, round: int, attempt: int = 0, client: int, step: int = 0, aux: int = 0) -> None:
        from ..comm.protocol import Message, outgoing
        self.inbox.append(Message(1, outgoing(kind, tensor, round, attempt, client, step, aux), tensor))

    def send(self, dest, kind, tensor=None, *, round=0, attempt=0, client=-1, step=0, aux=0):
        from ..comm.protocol import Kind, outgoing
        h = outgoing(kind, tensor, round, attempt, client, step, aux)
        at = {"round": h.round, "attempt": h.attempt, "client": h.client}
        if h.kind == Kind.PARAMS:
            self._queue(Kind.ACTS, self.acts[h.client], step=0, aux=1, **at)
        elif h.kind == Kind.BODY_OUT:
            self._queue(Kind.GRAD_OUT, self.grads[h.client], step=h.step, **at)
        elif h.kind == Kind.GRAD_ACTS:
            if h.step + 1 < self.steps:
                self._queue(Kind.ACTS, self.acts[h.client], step=h.step + 1, aux=1, **at)
            else:
                self._queue(Kind.UPDATE, self.update, aux=self.samples, **at)
        elif h.kind.name == "REJECT":
            raise RuntimeError(f"the server rejected a scripted message: {h.describe()}")
        return h

    def recv(self, source=-1, *, timeout: float, waiting_for: str = "a message", **_: object):
        if not self.inbox:
            raise RuntimeError(f"the server waits for {waiting_for}, which the script never sends")
        return self.inbox.popleft()

    def poll(self, source=-1) -> bool:
        return bool(self.inbox)

    def close(self) -> None:
        pass


def _check(args: argparse.Namespace) -> None:
    for name in ("clients", "server_batch", "batch_size", "steps", "rounds", "trials"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _scripted_server(args: argparse.Namespace, device):
    """A Server over ScriptedClients that answer at once from pre-made tensors; -> (server, model)."""
    import torch
    from torch.utils.data import TensorDataset

    from ..comm.protocol import wire_dtype
    from ..comm.wrappers import Counted
    from ..config import build_config
    from ..fed.server import Server
    from ..algorithms import build_algorithm
    from ..fed.state import Layout
    from ..model.split import build_model, freeze_except

    cfg = build_config({"model": {"name": args.model, "pretrained": False},  # timing needs no weights
                        "fed": {"clients": args.clients, "batch_size": args.batch_size, "rounds": 10**6},
                        "comm": {"server_batch": args.server_batch, "wire_dtype": args.wire_dtype,
                                 "server_dtype": args.server_dtype}})
    model = build_model(cfg.model, 10, seed=0, quiet=True)
    layout = Layout(model, build_algorithm(cfg).trained_names(model))
    freeze_except(model, set(layout.names))
    wire = wire_dtype(args.wire_dtype)
    n, d, b = model.tokens, model.width, args.batch_size
    gen = torch.Generator().manual_seed(0)
    acts = {c: torch.randn(b, n, d, generator=gen).to(wire) for c in range(args.clients)}
    grads = {c: (1e-3 * torch.randn(b, n, d, generator=gen)).to(wire) for c in range(args.clients)}
    script = ScriptedClients(acts, grads, args.steps, b * args.steps)
    empty = TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long))
    server = Server(cfg, model, layout, empty, {1: list(range(args.clients))}, Counted(script), device=device)
    script.update = layout.flatten(server.global_state)
    return server, model


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _body_alone_rate(body, n: int, d: int, device, batch: int, reps: int) -> float:
    """Samples per second of the body's forward and backward to its input alone, at ``batch``."""
    import torch
    x = torch.randn(batch, n, d, device=device)
    g = 1e-3 * torch.randn(batch, n, d, device=device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = body(leaf)
        torch.autograd.grad(out, leaf, g)
    _sync(device)
    return batch * reps / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> Report:
    _check(args)
    import os

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but no CUDA device is visible")
    server, model = _scripted_server(args, device)
    n, d, b = model.tokens, model.width, args.batch_size
    body = server.service.body.forward  # the body as the server runs it (autocast with --server-dtype bfloat16)

    sync = functools.partial(_sync, device)
    body_alone = functools.partial(_body_alone_rate, body, n, d, device)

    per_round = args.clients * args.steps * b
    candidates = sorted({b * k for k in (1, 2, 4, 8, 16) if k <= max(args.server_batch, 1) * 4} | {b})
    reps = max(1, per_round // b)
    best_alone = {c: 0.0 for c in candidates}
    best_serving, rows_served = 0.0, {}
    rnd = 0
    for c in candidates:
        body_alone(c, 1)  # warm-up
    rnd += 1
    server.run_round(rnd)  # warm-up
    for _ in range(args.trials):
        for c in candidates:
            best_alone[c] = max(best_alone[c], body_alone(c, max(1, reps * b // c)))
        sync()
        t0 = time.perf_counter()
        served = []
        for _ in range(args.rounds):
            rnd += 1
            served.append(server.run_round(rnd))
        sync()
        rate = args.rounds * per_round / (time.perf_counter() - t0)
        if rate > best_serving:
            best_serving, rows_served = rate, served[-1]
    best_batch = max(best_alone, key=best_alone.__getitem__)
    rows = [{"what": "body alone", "batch": c, "samples_per_s": best_alone[c]} for c in candidates]
    busy = rows_served["body_fwd_s"] + rows_served["body_bwd_s"]
    rows.append({"what": f"serving {args.clients} clients", "batch": rows_served["body_batch_mean"],
                 "samples_per_s": best_serving, "passes_per_round": rows_served["body_passes"],
                 "busy_frac": busy / max(rows_served["round_s"], 1e-12)})
    ratio = best_serving / best_alone[best_batch]
    notes = [f"{args.model} body ({model.depth - model.head_blocks - model.tail_blocks} blocks, N={n}, D={d}) on "
             f"{device}, {args.server_dtype} compute, {args.wire_dtype} on the wire, server batch {args.server_batch}, "
             f"{args.steps} steps x batch {b} per client; best body-alone batch {best_batch}"]
    return Report("server", rows, "serving / body-alone throughput", ratio, ">= 0.8 on a GPU", notes,
                  extra={"best_alone_batch": best_batch})
