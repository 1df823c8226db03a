"""Where ``estimate.count_pass_flops`` spends its time on the meta device, per aten op.

    python docs/experiments/startup/meta_op_times.py [ALGO]

Prints the whole count's time and the fifteen slowest ops (seconds, calls).
"""

from __future__ import annotations

import collections
import sys
import time

from torch.utils._python_dispatch import TorchDispatchMode

from sfprompt_mpi import estimate
from sfprompt_mpi.config import parse_config

SECONDS: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


class OpTimer(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        SECONDS[str(func)] += time.perf_counter() - t
        CALLS[str(func)] += 1
        return out


def main(algo: str) -> None:
    cfg = parse_config(["--algo", algo, "--clients", "4", "--devices", "jetson"])
    model, _ = estimate.build_meta_model(cfg, 10)
    full = estimate.backbone_flops(cfg, 10)
    t = time.perf_counter()
    with OpTimer():
        estimate.count_pass_flops(model, full)
    print(f"count_pass_flops ({algo}) under the op timer: {time.perf_counter() - t:.3f} s")
    for op, s in SECONDS.most_common(15):
        print(f"{s:7.3f} s {CALLS[op]:5d} {op}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sfprompt")
