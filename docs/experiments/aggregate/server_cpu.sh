#!/usr/bin/env bash
# Each rank's CPU seconds per round of `mpiexec -n 3 python -m sfprompt_mpi.run --algo fl-full`:
# runs of 3 and of 8 rounds, each rank under /usr/bin/time; the difference over 5 rounds leaves out start-up.
# usage: bash docs/experiments/aggregate/server_cpu.sh [CLIENTS]   (default 50)
set -euo pipefail
clients=${1:-50}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for rounds in 3 8; do
  mpiexec -n 3 sh -c 'exec /usr/bin/time -f "$PMI_RANK %U %S" -o '"$work"'/cpu'"$rounds"'.$PMI_RANK python -m sfprompt_mpi.run --algo fl-full --clients '"$clients"' --rounds '"$rounds"' --threads 1 --run-dir '"$work"'/run'"$rounds" > /dev/null 2>&1
done
for rank in 0 1 2; do
  read -r _ u3 s3 < "$work/cpu3.$rank"
  read -r _ u8 s8 < "$work/cpu8.$rank"
  echo "rank $rank: $(python3 -c "print(f'{(($u8 + $s8) - ($u3 + $s3)) / 5:.3f}')") s CPU per round"
done
