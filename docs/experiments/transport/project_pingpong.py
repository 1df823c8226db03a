"""The project's MPI transport against raw Send/Recv, with its wait's sched_yield or its receive
pool swapped out (issue 20, eleventh session).

mpiexec -n 2 python project_pingpong.py BYTES [noyield] [fixedbuf]   (PYTHONPATH=$PWD)
  noyield   the wait spins without sched_yield
  fixedbuf  every payload is received into one preallocated tensor instead of the pool's
The ping-pong is `bench transport`'s: rank 1 echoes the payload it received. Best of 3 x 200 round
trips for each side, three times.
"""
import os
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from sfprompt_mpi.comm.mpi import MPITransport
from sfprompt_mpi.comm.protocol import Kind

torch.set_num_threads(1)
comm = MPI.COMM_WORLD
me, peer = comm.Get_rank(), 1 - comm.Get_rank()
transport = MPITransport(comm)
if "noyield" in sys.argv:
    os.sched_yield = lambda: None  # node.poll_until looks it up at each call
if "fixedbuf" in sys.argv:
    fixed = {}

    def take(shape, dtype, nbytes):
        return fixed.setdefault(nbytes, torch.empty(shape, dtype=dtype))
    transport._received.take = take
n = int(sys.argv[1])
x = torch.arange(n // 4, dtype=torch.float32)
sb, rb = x.numpy().view(np.uint8), np.empty(n, np.uint8)


def project(reps):
    comm.Barrier()
    t0 = time.perf_counter()
    for s in range(reps):
        if me == 0:
            transport.send(peer, Kind.ACTS, x, round=1, client=0, step=s)
            msg = transport.recv(peer, timeout=60)
        else:
            msg = transport.recv(peer, timeout=60)
            transport.send(peer, Kind.BODY_OUT, msg.payload, round=1, client=0, step=s)
        msg = None
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


project(5)
raw(5)
for _ in range(3):
    a, b = min(raw(200) for _ in range(3)), min(project(200) for _ in range(3))
    if me == 0:
        print(f"{n} {sys.argv[2:]}: raw {a * 1e6:.1f} us, project {b * 1e6:.1f} us, ratio {a / b:.2f}", flush=True)
transport.close()
