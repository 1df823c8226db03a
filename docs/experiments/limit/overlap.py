"""The one-process run with and without evaluation overlapping the next round's training.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/experiments/limit/overlap.py overlap|serial RUN_DIR fl-full

``serial`` makes the server evaluate (and checkpoint) before it starts the next round, as the plain
loop does; ``overlap`` is the run as it is. Prints the mean ``round_s`` of rounds 2-5.
"""
import sys, statistics
import sfprompt_mpi.fed.server as srv
from sfprompt_mpi.metrics.h5 import read_metrics
mode, run_dir, algo = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "serial":
    orig = srv.Server.run_round
    srv.Server.run_round = lambda self, rnd, start_next=False: orig(self, rnd, start_next=False)
from sfprompt_mpi.run import main
main(["--reference", "--algo", algo, "--clients", "4", "--rounds", "5", "--threads", "1", "--run-dir", run_dir])
r = read_metrics(f"{run_dir}/metrics/rank00000.h5")["round_s"][1][1:]
print(mode, algo, "mean round_s rounds 2-5:", round(statistics.mean(r), 3))
