#!/bin/bash
# Where ranks 0 and 1 of a many-client SFPrompt run spend their time: py-spy on both (50 Hz), then
# the leaf functions and the functions with the most samples under them, per rank.
#   bash docs/experiments/scale/profile_ranks.sh [CLIENTS] [ROUNDS]     (from the repository root)
set -euo pipefail
clients=${1:-5000}; rounds=${2:-2}
out=$(mktemp -d)
args="-m sfprompt_mpi.run --dataset synthetic --synthetic-samples $((clients * 4)) --max-test-samples 64
      --clients $clients --rounds $rounds --batch-size 4 --threads 1 --run-dir $out/run"
OMP_NUM_THREADS=1 mpiexec -n 1 py-spy record -r 50 -f raw -o "$out/rank0.txt" -- python $args \
    : -n 1 py-spy record -r 50 -f raw -o "$out/rank1.txt" -- python $args : -n 1 python $args > "$out/log" 2>&1
grep "round" "$out/log"
for rank in 0 1; do
    python - "$out/rank$rank.txt" "$rank" <<'PY'
import collections, re, sys
leaf, inclusive, total = collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1)
    frames = [re.sub(r" \(.*", "", f) for f in stack.split(";")]
    total += int(n)
    leaf[frames[-1]] += int(n)
    for f in set(frames):
        inclusive[f] += int(n)
print(f"== rank {sys.argv[2]}: {total} samples; leaf functions")
for name, n in leaf.most_common(10):
    print(f"{n:7d} {name}")
print("-- inclusive")
for name, n in inclusive.most_common(40)[10:40]:
    print(f"{n:7d} {name}")
PY
done
rm -rf "$out"
