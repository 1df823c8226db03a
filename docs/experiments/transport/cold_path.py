"""How long the per-message Python takes right after a payload arrived, against the same code warm.

    PYTHONPATH=$PWD mpiexec -n 2 python docs/experiments/transport/cold_path.py [BYTES ...]

Rank 0 and rank 1 ping-pong a float32 payload of BYTES (default 4 KB, 1 MB, 4 MB) through the
project's MPI transport, 300 round trips. On rank 1, right after each receive, one header is
built and packed (``outgoing`` + ``pack_header``, what ``send`` does first) and timed, then nine
more in a row. Prints the mean of the first (cold: the payload's copy has just gone through the
core's caches) and of the next nine (warm).
"""
import sys
import time

import torch
from mpi4py import MPI

from sfprompt_mpi.comm import build_transport
from sfprompt_mpi.comm.protocol import Kind, outgoing, pack_header

sizes = [int(a) for a in sys.argv[1:]] or [4096, 1 << 20, 4 << 20]
t = build_transport("mpi", MPI.COMM_WORLD)
me = MPI.COMM_WORLD.Get_rank()
peer = 1 - me
T = time.perf_counter
for n in sizes:
    x = torch.arange(n // 4, dtype=torch.float32)
    cold = warm = 0.0
    N = 300
    for step in range(N):
        if me == 0:
            t.send(peer, Kind.ACTS, x, round=1, client=0, step=step)
            t.recv(peer, timeout=60)
        else:
            y = t.recv(peer, timeout=60).payload
            a = T()
            pack_header(outgoing(Kind.BODY_OUT, y, 1, 0, 0, step, 0))
            b = T()
            for _ in range(9):
                pack_header(outgoing(Kind.BODY_OUT, y, 1, 0, 0, step, 0))
            cold, warm = cold + b - a, warm + (T() - b) / 9
            t.send(peer, Kind.BODY_OUT, y, round=1, client=0, step=step)
            y = None
    if me == 1:
        print(f"{n} bytes: header built right after the receive {cold / N * 1e6:.1f} us, "
              f"the next nine {warm / N * 1e6:.1f} us each", flush=True)
t.close()
