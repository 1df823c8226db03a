"""A host's writer memory when it reopens its series every round.

``python docs/experiments/metrics/reopen_memory.py CLIENTS ROUNDS [METADATA_CACHE_MB]``: a
``MetricsWriter`` logs 8 series per client, CLIENTS clients, ROUNDS rounds (more series than the
writer keeps open, so from round 2 on every row reopens its datasets); prints the resident memory
the process gained and the milliseconds per client row after each round. With METADATA_CACHE_MB
the file's metadata cache is held at that size (1 MB initial) instead of HDF5's own adaptive one,
which the writer keeps (a 2 MB bound was tried in the tenth session: less memory, slower runs).
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


def bound_metadata_cache(w: h5.MetricsWriter, cache_mb: int) -> None:
    config = w._f.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = config.min_size = min(1 << 20, cache_mb << 20)
    config.max_size = cache_mb << 20
    w._f.id.set_mdc_config(config)


def main(clients: int, rounds: int, cache_mb: int | None) -> None:
    before = rss_mb()
    w = h5.MetricsWriter(tempfile.mkdtemp(), 1, role="client", attrs={})
    if cache_mb is not None:
        bound_metadata_cache(w, cache_mb)
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        for c in range(clients):
            w.log({f"clients/{c}/{k}": 0.5 for k in KEYS}, rnd, flush=False)
        w.log({"peak_mem_mb": 1.0}, rnd)
        print(f"round {rnd}: +{rss_mb() - before:.0f} MB, "
              f"{(time.perf_counter() - start) / clients * 1e3:.2f} ms per client row", flush=True)
    w.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
