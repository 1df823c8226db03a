"""A client host's HDF5 rows: milliseconds per client row and the memory the writer holds.

``python docs/experiments/metrics/client_rows.py [cache] [CLIENTS,...]``: a ``MetricsWriter`` logs 8
scalar stats per client for each client count (default 25,200), 5 rounds, one flush per round (as a
host does): 8 series per client in metrics schema 1, 8 tables in schema 2; prints the
milliseconds per client row in each round and how much the process's resident memory grew.
With ``cache`` the file is opened with HDF5's default chunk cache (1 MB per dataset), as before
the tenth session; without it, as the writer opens it now (no chunk cache).
"""

from __future__ import annotations

import sys
import tempfile
import time

import sfprompt_mpi.metrics.h5 as h5

KEYS = ["local_loss", "samples", "time/local", "time/upload", "time/wait", "time/split", "time/prune", "acc"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def main(cache: bool, counts: list[int]) -> None:
    if cache:
        h5._WRITER = {}
    for clients in counts:
        before = rss_mb()
        w = h5.MetricsWriter(tempfile.mkdtemp(), 1, role="client", attrs={})
        per_row = []
        for rnd in range(1, 6):
            start = time.perf_counter()
            for c in range(clients):
                w.log({f"clients/{c}/{k}": 0.5 for k in KEYS}, rnd, flush=False)
            w.log({"peak_mem_mb": 1.0}, rnd)
            per_row.append((time.perf_counter() - start) / clients * 1e3)
        print(f"{'cache' if cache else 'no cache'}, {clients} clients: ms per client row, rounds 1-5: "
              + " ".join(f"{x:.2f}" for x in per_row) + f"; resident memory +{rss_mb() - before:.0f} MB")
        w.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    cache = bool(args) and args[0] == "cache"
    rest = args[1:] if cache else args
    main(cache, [int(c) for c in rest[0].split(",")] if rest else [25, 200])
