"""Per-message cost of the whole path, load-robust: one process sends a message to itself through
Counted(MPITransport(COMM_SELF)) and receives it (send + recv + expect), min of 5 x 15 repeats of CPU time (process_time: robust to a loaded machine).
python selfmsg.py OLD_FILE"""
import importlib.util, sys, time, timeit
import torch
from mpi4py import MPI
import sfprompt_mpi.comm.mpi as new_mpi
from sfprompt_mpi.comm.protocol import Kind, expect
from sfprompt_mpi.comm.wrappers import Counted
from sfprompt_mpi.node import NodeLayout
spec = importlib.util.spec_from_file_location("sfprompt_mpi.comm._old_mpi", sys.argv[1])
old_mpi = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old_mpi; spec.loader.exec_module(old_mpi)
torch.set_num_threads(1)
layout = NodeLayout(0, 1, 2)
for n in (4096, 1 << 20):
    x = torch.arange(n // 4, dtype=torch.float32)
    shape = tuple(x.shape)
    res = {}
    for rep in range(5):
        for name, mod in (("old", old_mpi), ("new", new_mpi)):
            t = Counted(mod.MPITransport(MPI.COMM_SELF, layout=layout))
            def one():
                t.send(0, Kind.ACTS, x, round=1, client=0, step=3)
                m = t.recv(0, timeout=10.0, waiting_for="itself")
                expect(m.header, Kind.ACTS, step=3, shape=shape)
            number = 200 if n == 4096 else 20
            best = min(timeit.repeat(one, number=number, repeat=15, timer=time.process_time)) / number
            res[name] = min(res.get(name, 1e9), best)
            t.close()
    print(f"{n:>8} B message to itself: old {res['old'] * 1e6:.2f} us, new {res['new'] * 1e6:.2f} us, "
          f"saved {(res['old'] - res['new']) * 1e6:.2f} us")
