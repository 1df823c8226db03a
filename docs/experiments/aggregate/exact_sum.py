"""Time the server's per-update work: the exact sum in C and in torch, and the NaN/Inf check.

``python docs/experiments/aggregate/exact_sum.py [VALUES]`` (default 215882, the offline
default's ``fl-full`` vector), one thread: milliseconds per call, minimum and median of 20,
for ``ExactSum.add`` and ``ExactSum.mean`` with the C loops and with torch, and for
``all_finite`` against ``torch.isfinite(x).all()`` on the update and on one batch of
activations (32 x 65 x 192, an ``sfprompt`` split step's message).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from sfprompt_mpi.fed.aggregate import ExactSum, all_finite


def timed(fn, repeats: int = 20) -> str:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return f"{min(times):7.3f} / {statistics.median(times):7.3f} ms"


def main(values: int) -> None:
    torch.set_num_threads(1)
    x = torch.randn(values, generator=torch.Generator().manual_seed(0)) * 0.01
    acts = torch.randn(32, 65, 192)
    print(f"{values} values, min / median of 20 calls")
    for use_c in (True, False):
        acc = ExactSum(values, use_c=use_c)
        where = "C    " if use_c else "torch"
        print(f"ExactSum.add  {where} {timed(lambda: acc.add(x, 30))}")
        print(f"ExactSum.mean {where} {timed(acc.mean)}")
    for name, t in (("update", x), ("activations", acts)):
        print(f"all_finite        {name:12s} {timed(lambda: all_finite(t))}")
        print(f"isfinite().all()  {name:12s} {timed(lambda: bool(torch.isfinite(t).all()))}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 215882)
