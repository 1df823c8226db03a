"""``transport`` suite: the project's tensor messages against raw mpi4py, size by size.

Two ranks ping-pong a float32 tensor. The project's side is the whole path a
training message takes: ``Transport.send`` (header packed, payload staged,
bytes counted) and ``Transport.recv`` (header probed, unpacked and checked,
payload received into a fresh tensor, bytes counted), plus the receiver's
``expect`` on kind and shape. The limit is mpi4py's uppercase ``Send``/``Recv``
of the same number of bytes between preallocated NumPy buffers, on the same
two ranks, in the same run: raw and project trials alternate, and each side
keeps its best trial, so a noisy moment hurts both alike.

The raw side receives into one buffer again and again. The project's side
lets go of each payload before the next receive, so its receive pool hands the
same buffer out again. Holding on to the previous payload would make the pool
alternate between two buffers, which costs raw MPI as much: 14% at 4 MB and
37% at 16 MB on the development VM (cache and page-table effects).

Bandwidth counts the bytes of both directions of a round trip.
"""

from __future__ import annotations

import argparse
import time

from ..errors import UserError
from .common import Report, human_bytes, parse_size

TAG = 77
TIMEOUT_S = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-size", default="4K", help="smallest message (bytes, or with K/M/G)")
    p.add_argument("--max-size", default="64M", help="largest message; sizes grow by --step")
    p.add_argument("--step", type=int, default=4, help="factor between successive sizes")
    p.add_argument("--trials", type=int, default=5, help="alternating raw/project trials per size (best kept)")
    p.add_argument("--target", default="64M", help="bytes each trial moves at least (round trips = target/size, "
                                                   "at least 3)")
    p.add_argument("--transport", default="mpi", choices=("mpi", "gloo"), help="the project's transport to measure")


def sizes(args: argparse.Namespace) -> list[int]:
    lo, hi = parse_size(args.min_size), parse_size(args.max_size)
    if lo % 4 or hi < lo:
        raise UserError(f"--min-size {args.min_size} must be a multiple of 4 bytes and at most --max-size")
    if args.step < 2 or args.trials < 1:
        raise UserError("--step must be >= 2 and --trials >= 1")
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= args.step
    return out


class _PingPong:
    """Timed ping-pongs between the two ranks: raw mpi4py buffers, and the project's transport."""

    def __init__(self, comm, transport) -> None:
        self.comm, self.transport = comm, transport
        self.me, self.peer = comm.Get_rank(), 1 - comm.Get_rank()

    def raw(self, send_buf, recv_buf, reps: int) -> float:
        from mpi4py import MPI
        comm, peer = self.comm, self.peer
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if self.me == 0:
                comm.Send([send_buf, MPI.BYTE], peer, TAG)
                comm.Recv([recv_buf, MPI.BYTE], peer, TAG)
            else:
                comm.Recv([recv_buf, MPI.BYTE], peer, TAG)
                comm.Send([recv_buf, MPI.BYTE], peer, TAG)
        return time.perf_counter() - t0

    def project(self, x, reps: int) -> float:
        from ..comm.protocol import Kind, expect
        transport, peer, shape = self.transport, self.peer, tuple(x.shape)
        self.comm.Barrier()
        t0 = time.perf_counter()
        for step in range(reps):
            if self.me == 0:
                transport.send(peer, Kind.ACTS, x, round=1, client=0, step=step)
                msg = transport.recv(peer, timeout=TIMEOUT_S, waiting_for=f"echo of step {step}")
                expect(msg.header, Kind.BODY_OUT, step=step, shape=shape)
            else:
                msg = transport.recv(peer, timeout=TIMEOUT_S, waiting_for=f"step {step}")
                expect(msg.header, Kind.ACTS, step=step, shape=shape)
                y = msg.payload
                transport.send(peer, Kind.BODY_OUT, y, round=1, client=0, step=step)
                y = None
            msg = None  # done with the payload, as the raw side is with its buffer: the pool may hand it out again
        return time.perf_counter() - t0

    def row(self, n: int, reps: int, trials: int) -> dict:
        """Best of ``trials`` alternating raw and project trials of ``reps`` round trips of ``n`` bytes."""
        import numpy as np
        import torch
        x = torch.arange(n // 4, dtype=torch.float32)
        send_buf = x.numpy().view(np.uint8)  # the very memory the project sends from
        recv_buf = np.empty(n, dtype=np.uint8)
        self.raw(send_buf, recv_buf, 1)  # warm-up: connection set-up and first-touch of the buffers
        self.project(x, 1)
        best_raw, best_project = float("inf"), float("inf")
        for _ in range(trials):
            best_raw = min(best_raw, self.raw(send_buf, recv_buf, reps))
            best_project = min(best_project, self.project(x, reps))
        raw_bw, proj_bw = 2 * n * reps / best_raw / 1e9, 2 * n * reps / best_project / 1e9
        return {"size": human_bytes(n), "bytes": n, "round_trips": reps, "raw_GBps": raw_bw, "project_GBps": proj_bw,
                "raw_rtt_us": best_raw / reps * 1e6, "project_rtt_us": best_project / reps * 1e6,
                "ratio": proj_bw / raw_bw}


def run(args: argparse.Namespace) -> Report | None:
    """Both ranks run this; rank 0 returns the report, rank 1 None."""
    import torch
    from mpi4py import MPI

    from ..comm import build_transport
    from ..comm.wrappers import Counted

    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise UserError(f"the transport suite runs on exactly 2 ranks, not {comm.Get_size()}: "
                        "launch it without mpiexec (it starts mpiexec -n 2 itself) or with mpiexec -n 2")
    me = comm.Get_rank()
    target = parse_size(args.target)
    torch.set_num_threads(1)
    transport = Counted(build_transport(args.transport, comm))  # counted, as a run's transport is
    pingpong = _PingPong(comm, transport)
    rows = [pingpong.row(n, max(3, target // n), args.trials) for n in sizes(args)]
    transport.close()
    if me != 0:
        return None
    big = [r["ratio"] for r in rows if r["bytes"] >= 1 << 20]
    key = "min bandwidth ratio from 1 MB up" if big else "min bandwidth ratio (no size >= 1 MB measured)"
    notes = [f"{args.transport} transport vs mpi4py Send/Recv, {comm.Get_size()} ranks, "
             f"{MPI.Get_library_version().splitlines()[0].strip()}"]
    return Report("transport", rows, key, min(big or [r["ratio"] for r in rows]), ">= 0.95 from 1 MB up", notes)
