"""The server's question after every message, "who still owes an update?", old and new.

``python docs/experiments/scale/owing.py [CLIENTS]`` (default 5000, on 2 hosts, 3 messages per
client as SFPrompt's split step and update send): per message, the sort of every client of the
round with the set of their hosts (before the twelfth session) against ``fed.serving.Owing``.
"""

from __future__ import annotations

import random
import sys
import time

from sfprompt_mpi.fed.serving import Owing, short


def main(n: int) -> None:
    host_of = {c: 1 + c % 2 for c in range(n)}
    order = list(range(n))
    random.Random(0).shuffle(order)
    active, counts = set(range(n)), {}
    start, messages = time.perf_counter(), 0
    for cid in order:
        for _ in range(3):
            missing = sorted(active - counts.keys())
            _ = {host_of[c] for c in missing}, short(missing)
            messages += 1
        counts[cid] = 1
    old = (time.perf_counter() - start) / messages
    owing = Owing(list(range(n)), host_of)
    start, messages = time.perf_counter(), 0
    for cid in order:
        for _ in range(3):
            _ = owing.hosts(), short(owing.ids)
            messages += 1
        owing.settle(cid)
    new = (time.perf_counter() - start) / messages
    print(f"{n} clients, per message: sorted every time {old * 1e6:.0f} us, Owing {new * 1e6:.2f} us; "
          f"per round (3 messages per client): {old * messages:.2f} s against {new * messages:.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
