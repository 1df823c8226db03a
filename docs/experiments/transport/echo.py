"""Pure-mpi4py two-message pattern against raw Send/Recv, echoing the buffer just received or not
(issue 20, eleventh session).

mpiexec -n 2 python echo.py BYTES MODE     MODE: dash-joined words of
  fixed  receive the payload into one buffer (else a fresh array per message)
  echo   send back the buffer just received (as `bench transport` does; else another buffer)
  yield  sched_yield in the header wait (as the transport's spin does)
The pattern is the transport's: a 15-int64 header through a persistent any-source receive, then the
payload's Irecv posted once its header arrived, Test loops; sends are Isend, reaped when done.
Prints the best of 3 x 200 round trips for each side, twice.
"""
import os
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

comm = MPI.COMM_WORLD.Dup()
me, peer = comm.Get_rank(), 1 - comm.Get_rank()
n, mode = int(sys.argv[1]), sys.argv[2]
x = torch.arange(n // 4, dtype=torch.float32)
sb, rb = x.numpy().view(np.uint8), np.empty(n, np.uint8)
hb = np.zeros(15, np.int64)
hreq = comm.Recv_init([hb, MPI.INT64_T], MPI.ANY_SOURCE, 1)
hreq.Start()
pending = []


def send(buf):
    global pending
    pending = [p for p in pending if not p[0].Test()]
    words = np.arange(15, dtype=np.int64)
    pending.append((comm.Isend([words, MPI.INT64_T], peer, 1), words))
    pending.append((comm.Isend([buf, MPI.BYTE], peer, 2), buf))


def recv():
    st = MPI.Status()
    while not hreq.Test(st):
        if "yield" in mode:
            os.sched_yield()
    hb.tolist()
    hreq.Start()
    buf = rb if "fixed" in mode else np.empty(n, np.uint8)
    req = comm.Irecv([buf, MPI.BYTE], peer, 2)
    while not req.Test(st):
        pass
    return buf


def pattern(reps):
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        if me == 0:
            send(sb)
            recv()
        else:
            got = recv()
            send(got if "echo" in mode else sb)
    return (time.perf_counter() - t0) / reps


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


pattern(5)
raw(5)
for _ in range(2):
    a, b = min(raw(200) for _ in range(3)), min(pattern(200) for _ in range(3))
    if me == 0:
        print(f"{n} {mode}: raw {a * 1e6:.1f} us, pattern {b * 1e6:.1f} us, ratio {a / b:.2f}", flush=True)
for req, _ in pending:
    req.Wait()
comm.Barrier()
hreq.Cancel()
hreq.Wait()
hreq.Free()
