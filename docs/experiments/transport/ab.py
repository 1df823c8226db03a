"""A/B of two MPITransport versions in one run under mpiexec -n 2: raw Send/Recv, old, new, alternating
trials, best kept. python ab.py OLD_FILE [trials] [sizes]"""
import importlib.util, sys
import numpy as np, torch
from mpi4py import MPI
import sfprompt_mpi.comm.mpi as new_mpi
from sfprompt_mpi.comm.wrappers import Counted
from sfprompt_mpi.bench.transport import _PingPong

spec = importlib.util.spec_from_file_location("sfprompt_mpi.comm._old_mpi", sys.argv[1])
old_mpi = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old_mpi; spec.loader.exec_module(old_mpi)
trials = int(sys.argv[2]) if len(sys.argv) > 2 else 9
sizes = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "4096,262144,1048576,4194304,16777216").split(",")]
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
order = (("new", new_mpi), ("old", old_mpi)) if "flip" in sys.argv else (("old", old_mpi), ("new", new_mpi))
pp = {name: _PingPong(comm, Counted(mod.MPITransport(comm))) for name, mod in order}
for n in sizes:
    reps = max(16, min(2000, (32 << 20) // n))
    x = torch.arange(n // 4, dtype=torch.float32)
    send_buf, recv_buf = x.numpy().view(np.uint8), np.empty(n, np.uint8)
    raw = pp["old"]
    raw.raw(send_buf, recv_buf, 3)
    for p in pp.values():
        p.project(x, 3)
    best = {"raw": 1e9, "old": 1e9, "new": 1e9}
    for _ in range(trials):
        best["raw"] = min(best["raw"], raw.raw(send_buf, recv_buf, reps) / reps)
        for name, p in pp.items():
            best[name] = min(best[name], p.project(x, reps) / reps)
    if comm.Get_rank() == 0:
        r = best["raw"]
        print(f"{n:>9} B {reps:5d} rt: raw {r * 1e6:8.1f} us  old {best['old'] * 1e6:8.1f} us ({r / best['old']:.3f})"
              f"  new {best['new'] * 1e6:8.1f} us ({r / best['new']:.3f})  old-new {(best['old'] - best['new']) * 1e6:+.1f} us",
              flush=True)
for p in pp.values():
    p.transport.close()
