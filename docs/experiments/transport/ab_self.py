"""Per-message Python of two versions of the MPI transport, interleaved in one process.

    git worktree add /tmp/old REV
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/experiments/transport/ab_self.py /tmp/old [BYTES ...]

Copies ``/tmp/old/sfprompt_mpi`` to a temporary folder as the package ``sfprompt_mpi_old`` (its
imports are relative), then sends a float32 tensor of BYTES (default 4096, 262144, 1048576) from
rank 0 to itself and receives it, through the old and the working tree's ``MPITransport`` on
``COMM_SELF``: 15 trials of 1000 messages (200 from 256 KB up) each, old and new in alternating
order. Prints min and median microseconds per message (send and receive) and the median over the
trials of new / old: one process and interleaved trials, so the VM's changes of speed, which move
a single figure by 1.5x, touch both alike.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from mpi4py import MPI

old_pkg = Path(tempfile.mkdtemp()) / "sfprompt_mpi_old"
shutil.copytree(Path(sys.argv[1]) / "sfprompt_mpi", old_pkg)
sys.path.insert(0, str(old_pkg.parent))
from sfprompt_mpi_old.comm.mpi import MPITransport as Old  # noqa: E402
from sfprompt_mpi_old.comm.protocol import Kind as OldKind  # noqa: E402

from sfprompt_mpi.comm.mpi import MPITransport as New  # noqa: E402
from sfprompt_mpi.comm.protocol import Kind as NewKind  # noqa: E402
from sfprompt_mpi.node import NodeLayout  # noqa: E402

torch.set_num_threads(1)
layout = NodeLayout(0, 1, 2)
sides = {"old": (Old(MPI.COMM_SELF, layout=layout), OldKind), "new": (New(MPI.COMM_SELF, layout=layout), NewKind)}
sizes = [int(a) for a in sys.argv[2:]] or [4096, 262144, 1 << 20]
times: dict[tuple[str, int], list[float]] = {(k, n): [] for k in sides for n in sizes}
for trial in range(15):
    for n in sizes:
        x = torch.arange(n // 4, dtype=torch.float32)
        reps = 1000 if n < 262144 else 200
        for name, (transport, kind) in (list(sides.items())[::1 if trial % 2 else -1]):
            t0 = time.perf_counter()
            for step in range(reps):
                transport.send(0, kind.ACTS, x, round=1, client=0, step=step)
                msg = transport.recv(0, timeout=10.0)
                msg = None
            times[(name, n)].append((time.perf_counter() - t0) / reps * 1e6)
for n in sizes:
    old, new = times[("old", n)], times[("new", n)]
    ratio = sorted(b / a for a, b in zip(old, new))[len(old) // 2]
    print(f"{n:>8} B: old min {min(old):6.1f} median {sorted(old)[len(old) // 2]:6.1f} us, new min {min(new):6.1f} "
          f"median {sorted(new)[len(new) // 2]:6.1f} us; new / old, median of the trials {ratio:.3f}")
for transport, _ in sides.values():
    transport.close()
