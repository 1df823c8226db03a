"""CPU and private memory of a rank's imports, with ``torch._dynamo`` deferred or not.

    PYTHONPATH=$PWD python docs/experiments/memory/import_memory.py defer|keep

``defer`` installs ``sfprompt_mpi.lean``'s stand-in first, as ``python -m sfprompt_mpi.run`` does;
``keep`` imports as usual. Then the rank's imports, then one line: ``/proc/self/smaps_rollup``
(GB), the process's CPU seconds so far, and whether the real ``torch._dynamo`` was loaded.
"""

import importlib
import os
import sys

if sys.argv[1:] == ["defer"]:
    from sfprompt_mpi.lean import defer_imports
    defer_imports()
elif sys.argv[1:] != ["keep"]:
    sys.exit("usage: import_memory.py defer|keep")

for name in ("h5py", "mpi4py.MPI", "timm", "torch", "torchvision", "sfprompt_mpi.run", "sfprompt_mpi.runtime"):
    importlib.import_module(name)
from sfprompt_mpi.lean import dynamo_deferred

fields = {}
for line in open("/proc/self/smaps_rollup"):
    key, *rest = line.split()
    if key in ("Rss:", "Private_Clean:", "Private_Dirty:"):
        fields[key[:-1]] = round(int(rest[0]) / 2**20, 3)
t = os.times()
print(sys.argv[1], fields, "GB; CPU", round(t.user + t.system, 2), "s; real torch._dynamo loaded:", not dynamo_deferred())
