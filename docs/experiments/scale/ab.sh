#!/bin/bash
# A bench command at an older commit and in the working tree, alternating (the VM's speed moves by
# up to 2x within an hour, so only side-by-side figures compare).
#   bash docs/experiments/scale/ab.sh REV REPEATS BENCH_ARGS...      (from the repository root)
#   bash docs/experiments/scale/ab.sh 311ff45 2 scale --clients 500 --rounds 3
set -euo pipefail
rev=$1; reps=$2; shift 2
old=$(mktemp -d)/old
git worktree add -f --detach "$old" "$rev" > /dev/null
trap 'git worktree remove --force "$old"' EXIT
cp sfprompt_mpi/fed/_exactsum*.so "$old/sfprompt_mpi/fed/" 2> /dev/null || true  # the C sum, if built
for i in $(seq "$reps"); do
    for dir in "$old" "$PWD"; do
        echo "== $([[ $dir == "$old" ]] && echo "$rev" || echo "working tree") $i"
        (cd "$dir" && PYTHONPATH=$dir OMP_NUM_THREADS=1 python -m sfprompt_mpi.bench "$@" 2>&1 |
            grep -vE "^#|^$" | tail -n 8)
    done
done
