"""Per-step times of client training inside the one-process run, then alone.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/experiments/limit/steptime.py RUN_DIR [serial]

Replaces ``LocalTrainer.train`` with the same loop plus timers (forward, backward, optimiser step
and the whole call), runs ``--reference --algo fl-full --clients 4 --rounds 4``, then trains the
same four clients on a second thread of this process with no server beside them. Prints the
medians and per-round sums of rounds 2-4. ``serial``: the server evaluates before it starts the
next round.
"""
import sys, time, threading, statistics
import torch
import sfprompt_mpi.fed.training as tr

steps = []
calls = []
def train(self, forward, indices, generator, *, epochs, lr, batch_size):
    c0 = time.perf_counter()
    try:
        return _train(self, forward, indices, generator, epochs=epochs, lr=lr, batch_size=batch_size)
    finally:
        calls.append(time.perf_counter() - c0)
def _train(self, forward, indices, generator, *, epochs, lr, batch_size):
    opt = tr.make_optimizer(self.trainable, self.cfg, lr)
    self.model.train()
    total, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        for images, labels in self.batches(indices, generator, batch_size):
            t0 = time.perf_counter()
            logits = forward(images)
            loss = tr.F.cross_entropy(logits, labels)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            steps.append((threading.current_thread().name, t1 - t0, t2 - t1, t3 - t2))
            total += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
    return total / max(seen, 1), correct / max(seen, 1)
tr.LocalTrainer.train = train


def report(label):
    """Medians and per-round sums of rounds 2-4 (the first quarter of the steps is round 1)."""
    later = steps[len(steps) // 4:]
    print(label)
    for i, name in ((1, "fwd"), (2, "bwd"), (3, "step")):
        print(name, "median ms", round(1000 * statistics.median(s[i] for s in later), 2),
              "sum s/round", round(sum(s[i] for s in later) / 3, 3))
    print("train calls s/round (rounds 2-4)", round(sum(calls[4:]) / 3, 3),
          "steps s/round", round(sum(s[1] + s[2] + s[3] for s in later) / 3, 3))


if len(sys.argv) > 2 and sys.argv[2] == "serial":  # evaluate before the next round starts (see overlap.py)
    import sfprompt_mpi.fed.server as srv
    run_round = srv.Server.run_round
    srv.Server.run_round = lambda self, rnd, start_next=False: run_round(self, rnd, start_next=False)

from sfprompt_mpi.run import main
main(["--reference", "--algo", "fl-full", "--clients", "4", "--rounds", "4", "--threads", "1", "--run-dir", sys.argv[1]])
report("run:")

# alone: the same patched loop, the same four clients, from the run's initial parameters, no server
steps.clear(); calls.clear()
from sfprompt_mpi.bench.plain import PlainLoop
from sfprompt_mpi.data.datasets import build_data
from sfprompt_mpi.runtime import _image_size
loop = PlainLoop(["--algo", "fl-full", "--clients", "4", "--rounds", "4", "--threads", "1"])
data = build_data(loop.cfg.data, _image_size(loop.cfg), loop.cfg.run.seed)
trainer = tr.LocalTrainer(loop.cfg, loop.model, loop.trained, data.train, torch.device("cpu"))
start_F = loop.layout.flatten(loop.layout.read(loop.model)).clone()
def go():
    for rnd in range(4):
        for cid in range(4):
            loop.layout.write(loop.model, loop.layout.unflatten(start_F))
            trainer.train(loop.model, loop.shards[cid], torch.Generator().manual_seed(rnd * 10 + cid), epochs=1, lr=loop.cfg.fed.lr, batch_size=loop.cfg.fed.batch_size)
th = threading.Thread(target=go, name="alone"); th.start(); th.join()
report("alone:")
