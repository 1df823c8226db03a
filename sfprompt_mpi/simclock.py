"""The simulated clock: how long a round would have taken on the devices the clients stand for.

A client's round is a *plan*, the sequence of what it did, built from what
the run counted: the global parameters down, its compute before split
training (the algorithm's phases, priced per sample by the cost accounting's
FLOP counter), then per body request the head's forward, the activations up,
the server's body pass, the body output down, the tail's forward and
backward, and (when a gradient travels back) the gradient up, the body's
backward, the input gradient down and the head's backward; last the update
up. Each step is one of

- ``("compute", flops)``: on the client, flops / its speed;
- ``("up", bytes)`` / ``("down", bytes)``: one message, latency + bits / rate,
  the rate being the client's link capped by the server's;
- ``("server", flops)``: a request to the server, which is one queue shared
  by the clients of the round (a discrete-event model) serving by one of
  :data:`POLICIES`: ``fifo``, one request at a time, the earliest arrival
  first (ties: the lower client id); ``in_turn`` (a body the server trains),
  one client after the other in id order, each after the previous one's
  update, as the runtime does; ``merge`` (feature merging), one pass over
  every remaining client's request once the last of them has arrived. The
  client waits from its request's arrival to the pass's end.

A synchronous round ends when its slowest client's update has arrived plus
the server's aggregation. Nothing here depends on how many MPI ranks host
the clients: the plans are built from per-client counts and step numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .devices import Device, Devices, Server

Step = tuple[str, float]
PARTS = ("compute", "down", "up", "server")
POLICIES = ("fifo", "in_turn", "merge")


@dataclass
class ClientTime:
    """One client's simulated round, in seconds; ``server`` is the time waiting for (and served by) the server."""

    compute: float = 0.0
    down: float = 0.0
    up: float = 0.0
    server: float = 0.0
    finish: float = 0.0
    idle: float = 0.0     # from its finish to the round's last client's finish (the straggler wait)


@dataclass
class RoundTime:
    """A simulated round: its length and each client's breakdown."""

    seconds: float
    aggregate: float
    clients: dict[int, ClientTime] = field(default_factory=dict)
    server_busy: float = 0.0


def transfer_s(nbytes: float, mbps: float, device: Device, server: Server) -> float:
    """One message of ``nbytes`` over a link of ``mbps`` (capped by the server's link): latency + bits / rate."""
    rate = min(mbps, server.mbps) if server.mbps else mbps
    return device.latency_ms / 1e3 + 8.0 * nbytes / (rate * 1e6)


def simulate(plans: dict[int, Sequence[Step]], devices: Devices, *, policy: str = "fifo",
             aggregate_flops: float = 0.0) -> RoundTime:
    """Run the round's plans (client id -> steps) through the clients' devices and the server's queue
    (``policy``: one of :data:`POLICIES`)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown server policy {policy!r}")
    server = devices.server
    times = {c: ClientTime() for c in plans}
    now = {c: 0.0 for c in plans}
    pos = {c: 0 for c in plans}
    waiting: dict[int, tuple[float, float]] = {}   # client -> (arrival, flops) of its request
    done: set[int] = set()

    def advance(c: int) -> None:
        """Run client ``c``'s steps up to its next server request or its end."""
        plan, dev, t = plans[c], devices.clients[c], times[c]
        while pos[c] < len(plan):
            kind, amount = plan[pos[c]]
            if kind == "server":
                waiting[c] = (now[c], amount)
                return
            if kind == "compute":
                dt = amount / (dev.tflops * 1e12)
            elif kind in ("up", "down"):
                dt = transfer_s(amount, dev.up_mbps if kind == "up" else dev.down_mbps, dev, server)
            else:
                raise ValueError(f"unknown plan step {kind!r}")
            setattr(t, kind, getattr(t, kind) + dt)
            now[c] += dt
            pos[c] += 1
        done.add(c)

    for c in sorted(plans):
        advance(c)
    free, busy, turn = 0.0, 0.0, sorted(plans)
    while waiting:
        if policy == "in_turn":  # the turn passes when the client before has sent its update
            c = next(c for c in turn if c not in done)
            free = max([free, *(now[d] for d in turn[:turn.index(c)])])
            served = [c]
        elif policy == "merge":  # every client still in the round is waiting: one merged pass
            served = sorted(waiting)
        else:
            served = [min(waiting, key=lambda k: (waiting[k][0], k))]
        requests = [waiting.pop(c) for c in served]
        work = sum(flops for _, flops in requests) / (server.tflops * 1e12)
        free = max([free, *(arrival for arrival, _ in requests)]) + work
        busy += work
        for c, (arrival, _) in zip(served, requests):
            times[c].server += free - arrival
            now[c] = free
            pos[c] += 1
            advance(c)
    last = max(now.values(), default=0.0)
    for c, t in times.items():
        t.finish, t.idle = now[c], last - now[c]
    agg = aggregate_flops / (server.tflops * 1e12)
    return RoundTime(seconds=last + agg, aggregate=agg, clients=times, server_busy=busy)


def client_plan(*, params_bytes: int, pre_flops: float, requests: Iterable[tuple[int, int, bool]],
                update_bytes: int, f) -> list[Step]:
    """One client's plan: parameters down, ``pre_flops`` of compute, then per body request
    ``(batch, message bytes, gradient travels back)`` the split step, then the update up.
    ``f``: the FLOPs per sample of every pass (:class:`sfprompt_mpi.estimate.PassFlops`)."""
    plan: list[Step] = [("down", params_bytes), ("compute", pre_flops)]
    for batch, nbytes, grad in requests:
        plan += [("compute", batch * f.head_fwd), ("up", nbytes), ("server", batch * f.body_fwd), ("down", nbytes),
                 ("compute", batch * (f.tail_fwd + f.tail_bwd))]
        if grad:
            plan += [("up", nbytes), ("server", batch * f.body_bwd), ("down", nbytes),
                     ("compute", batch * f.head_bwd)]
    plan.append(("up", update_bytes))
    return plan


def round_row(sim: RoundTime, order: list[int]) -> dict[str, object]:
    """The server's HDF5 columns of a simulated round (per-client arrays in the order of ``selected``)."""
    import numpy as np
    row: dict[str, object] = {"sim/round_s": sim.seconds, "sim/aggregate_s": sim.aggregate,
                              "sim/server_busy_s": sim.server_busy}
    for part in (*PARTS, "finish", "idle"):
        row[f"sim/client_{part}_s"] = np.array([getattr(sim.clients[c], part) for c in order], dtype=np.float64)
    return row


class SimClock:
    """The server's simulated clock of a run: each round's plans from what it counted, through the devices.

    ``algorithm`` prices the compute before split training (its ``client_flops`` phases other than
    'split'; the split step is priced per body request); ``f`` is the run's :class:`PassFlops`;
    ``policy``: how the server's queue serves (:data:`POLICIES`, the body's). ``last`` is the
    latest round's :class:`RoundTime`, for algorithms that adapt to it.
    """

    def __init__(self, devices: Devices, algorithm, f, *, numel: int, policy: str) -> None:
        self.devices, self.algorithm, self.f = devices, algorithm, f
        self.numel, self.policy = numel, policy
        self.last: RoundTime | None = None

    def round(self, shards: dict[int, int], requests: dict[int, list[tuple[int, int, int, bool]]],
              update_bytes: dict[int, int], params_bytes: int | dict[int, int], rnd: int = 0) -> RoundTime:
        """Round ``rnd`` of the clients in ``shards`` (id -> samples): their requests, update sizes, and
        the size of the parameter message each received (one size for all, or per client)."""
        plans = {}
        for c, shard in shards.items():
            phases = self.algorithm.round_flops(rnd, c, shard, self.f)
            pre = sum(v for k, v in phases.items() if k != "split")
            steps = [(b, n, g) for _, b, n, g in sorted(requests.get(c, []))]
            down = params_bytes[c] if isinstance(params_bytes, dict) else params_bytes
            plans[c] = client_plan(params_bytes=down, pre_flops=pre, requests=steps,
                                   update_bytes=update_bytes[c], f=self.f)
        self.last = simulate(plans, self.devices, policy=self.policy, aggregate_flops=len(plans) * self.numel)
        return self.last
