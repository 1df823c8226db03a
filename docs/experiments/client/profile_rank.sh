#!/bin/bash
# Where a client rank's round goes (issue 20): py-spy on rank 1 of `mpiexec -n 3`, then the
# samples under each of ClientHost.serve's callees and of LocalTrainer.train's.
#   bash docs/experiments/client/profile_rank.sh [CLIENTS] [ROUNDS]   (from the repository root)
set -euo pipefail
clients=${1:-50}; rounds=${2:-8}
out=$(mktemp -d)
args="-m sfprompt_mpi.run --algo fl-full --clients $clients --rounds $rounds --threads 1 --run-dir $out/run"
OMP_NUM_THREADS=1 mpiexec -n 1 python $args : -n 1 py-spy record -r 250 -f raw -o "$out/rank1.txt" -- python $args \
    : -n 1 python $args > "$out/log" 2>&1
python - "$out/rank1.txt" <<'PY'
import collections, re, sys
def under(target):
    c, total = collections.Counter(), 0
    for line in open(sys.argv[1]):
        stack, n = line.rsplit(" ", 1)
        frames = [re.sub(r" \((.*?):(\d+)\)", r" \1:\2", f) for f in stack.split(";")]
        names = [re.sub(r" \S+:\d+$", "", f) for f in frames]
        if target in names:
            i = names.index(target)
            c[frames[i + 1] if i + 1 < len(frames) else "(itself)"] += int(n)
            total += int(n)
    print(f"== {target}: {total} samples (250 per second)")
    for k, v in c.most_common(8):
        print(f"{v:6d} {k}")
for t in ("ClientHost.serve", "ClientHost.run_client_round", "LocalTrainer.train", "MetricsWriter.log"):
    under(t)
PY
rm -rf "$out"
