"""One client's training loop alone: the run's ``LocalTrainer`` against the plain loop's ``_epochs``.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/experiments/limit/train_alone.py [main|thread]

Builds what ``bench limit`` builds for ``fl-full`` (4 clients, the offline default), then times one
epoch of client 0 from the same global parameters with each loop, alternating, 5 times each; prints
the min and median seconds. ``thread`` runs the timings on a second thread, as the one-process run's
client host does. Compare with ``clients/0/time/local`` in ``metrics/rank00001.h5`` of
``python -m sfprompt_mpi.run --reference --algo fl-full --clients 4 --threads 1``.
"""

import sys
import threading
import time

import numpy as np
import torch

from sfprompt_mpi.bench.plain import PlainLoop
from sfprompt_mpi.data.datasets import build_data
from sfprompt_mpi.fed.training import LocalTrainer
from sfprompt_mpi.runtime import _image_size

loop = PlainLoop(["--algo", "fl-full", "--clients", "4", "--rounds", "4", "--threads", "1"])
data = build_data(loop.cfg.data, _image_size(loop.cfg), loop.cfg.run.seed)
shard = loop.shards[0]
start_F = loop.layout.flatten(loop.layout.read(loop.model)).clone()
trainer = LocalTrainer(loop.cfg, loop.model, loop.trained, data.train, torch.device("cpu"))
fed = loop.cfg.fed


def ours() -> None:
    loop.layout.write(loop.model, loop.layout.unflatten(start_F))
    trainer.train(loop.model, shard, torch.Generator().manual_seed(1), epochs=1, lr=fed.lr, batch_size=fed.batch_size)


def plain() -> None:
    loop.layout.write(loop.model, loop.layout.unflatten(start_F))
    loop._epochs(loop.model, shard, torch.Generator().manual_seed(1), 1, fed.lr)


def bench(mode: str) -> None:
    ours(), plain()  # warm-up: the rendered-image cache, the allocator
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(5):
        for name, f in (("ours", ours), ("plain", plain)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    print(mode, "min", {k: round(min(v), 3) for k, v in times.items()},
          "median", {k: round(float(np.median(v)), 3) for k, v in times.items()})


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "main"
    if mode == "thread":
        worker = threading.Thread(target=bench, args=(mode,))
        worker.start()
        worker.join()
    else:
        bench(mode)
