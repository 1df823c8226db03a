"""A 2-rank ping-pong against raw Send/Recv: the transport's message pattern in pure mpi4py, or the
project's transport itself (issue 20, eleventh session).

mpiexec -n 2 python echo.py BYTES MODE     (PYTHONPATH=$PWD)   MODE: dash-joined words of
  project  the project's MPITransport (else the pure-mpi4py pattern below)
  echo     send back the buffer just received (as `bench transport` does; else another buffer;
           the project always echoes)
  fixed    receive the payload into one buffer (else a fresh array, or the transport's pool)
  yield    the pattern's header wait calls sched_yield (the transport's does unless `noyield`)
  noyield  the transport's wait spins without sched_yield
The pattern is the transport's: a 15-int64 header through a persistent any-source receive, then
the payload's Irecv posted once its header arrived, Test loops; sends are Isend, reaped when done.
Prints the best of 3 x 200 round trips for each side, three times.
"""
import os
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

torch.set_num_threads(1)
comm = MPI.COMM_WORLD.Dup()
me, peer = comm.Get_rank(), 1 - comm.Get_rank()
n, mode = int(sys.argv[1]), sys.argv[2].split("-")
x = torch.arange(n // 4, dtype=torch.float32)
sb, rb = x.numpy().view(np.uint8), np.empty(n, np.uint8)


class Pattern:
    def __init__(self):
        self.header = np.zeros(15, np.int64)
        self.inbox = comm.Recv_init([self.header, MPI.INT64_T], MPI.ANY_SOURCE, 1)
        self.inbox.Start()
        self.pending = []

    def send(self, buf):
        self.pending = [p for p in self.pending if not p[0].Test()]
        words = np.arange(15, dtype=np.int64)
        self.pending.append((comm.Isend([words, MPI.INT64_T], peer, 1), words))
        self.pending.append((comm.Isend([buf, MPI.BYTE], peer, 2), buf))

    def recv(self):
        st = MPI.Status()
        while not self.inbox.Test(st):
            if "yield" in mode:
                os.sched_yield()
        self.header.tolist()
        self.inbox.Start()
        buf = rb if "fixed" in mode else np.empty(n, np.uint8)
        req = comm.Irecv([buf, MPI.BYTE], peer, 2)
        while not req.Test(st):
            pass
        return buf

    def round_trips(self, reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if me == 0:
                self.send(sb)
                self.recv()
            else:
                got = self.recv()
                self.send(got if "echo" in mode else sb)
        return (time.perf_counter() - t0) / reps

    def close(self):
        for req, _ in self.pending:
            req.Wait()
        comm.Barrier()
        self.inbox.Cancel()
        self.inbox.Wait()
        self.inbox.Free()


class Project:
    def __init__(self):
        from sfprompt_mpi.comm.mpi import MPITransport
        self.transport = MPITransport(comm)
        if "noyield" in mode:
            os.sched_yield = lambda: None  # node.poll_until looks it up at each call
        if "fixed" in mode:
            kept = {}
            self.transport._received.take = lambda shape, dtype, nbytes: kept.setdefault(
                nbytes, torch.empty(shape, dtype=dtype))

    def round_trips(self, reps):
        from sfprompt_mpi.comm.protocol import Kind
        comm.Barrier()
        t0 = time.perf_counter()
        for s in range(reps):
            if me == 0:
                self.transport.send(peer, Kind.ACTS, x, round=1, client=0, step=s)
                msg = self.transport.recv(peer, timeout=60)
            else:
                msg = self.transport.recv(peer, timeout=60)
                self.transport.send(peer, Kind.BODY_OUT, msg.payload, round=1, client=0, step=s)
            msg = None
        return (time.perf_counter() - t0) / reps

    def close(self):
        self.transport.close()


def raw(reps):
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        if me == 0:
            comm.Send([sb, MPI.BYTE], peer, 77)
            comm.Recv([rb, MPI.BYTE], peer, 77)
        else:
            comm.Recv([rb, MPI.BYTE], peer, 77)
            comm.Send([rb, MPI.BYTE], peer, 77)
    return (time.perf_counter() - t0) / reps


side = Project() if "project" in mode else Pattern()
side.round_trips(5)
raw(5)
for _ in range(3):
    a, b = min(raw(200) for _ in range(3)), min(side.round_trips(200) for _ in range(3))
    if me == 0:
        print(f"{n} {sys.argv[2]}: raw {a * 1e6:.1f} us, {type(side).__name__.lower()} {b * 1e6:.1f} us, "
              f"ratio {a / b:.2f}", flush=True)
side.close()
