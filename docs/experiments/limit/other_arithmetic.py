"""Other arithmetic for the clients (``torch.func.vmap``, ``torch.compile``): how much one core could gain, and at what bits.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 [TIMM_FUSED_ATTN=0] python docs/experiments/limit/other_arithmetic.py [CLIENTS] [STEPS]

Builds what ``bench limit`` builds for ``fl-full`` (the offline default model, one thread), then
trains CLIENTS copies of the global model for STEPS batches of 32 each, from their own samples:

- ``loop``: one client after the other, as the run's client host does (forward, backward, Adam
  with ``foreach=True``);
- ``vmap``: every client's step at once: ``vmap(grad(loss))`` over the parameters stacked on a
  leading client dimension, then one Adam over the stacked tensors (Adam is elementwise, so
  stacking changes no bits of its own);
- ``compiled``: the ``loop`` with ``torch.compile(model)`` (inductor's C++ kernels; the compile
  itself is timed apart, in the warm-up).

``TIMM_FUSED_ATTN=0`` makes timm's attention plain matmuls and a softmax, which ``vmap`` batches;
with the fused kernel (the default) ``vmap`` falls back to a loop over the clients.

Prints the min and median seconds of each over 5 alternating repetitions and how far the two
results are apart (bitwise equal or the largest difference), so a reader can see whether a
vectorised client host could keep the run's bitwise contract (one process = N ranks).
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from sfprompt_mpi.bench.plain import PlainLoop

CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
BATCH = 32

loop = PlainLoop(["--algo", "fl-full", "--clients", str(CLIENTS), "--rounds", "1", "--threads", "1"])
model, lr = loop.model, loop.cfg.fed.lr
model.train()
names = [n for n, p in model.named_parameters() if p.requires_grad]
start = {n: p.detach().clone() for n, p in model.named_parameters()}
batches = []  # batches[c][s] = (x, y)
for c in range(CLIENTS):
    idx = torch.as_tensor(loop.shards[c][: STEPS * BATCH])
    x, y = loop.train_x[idx], loop.train_y[idx]
    batches.append([(x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]) for s in range(STEPS)])


def sequential(forward=model) -> list[dict[str, torch.Tensor]]:
    out = []
    for c in range(CLIENTS):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=True)
        for x, y in batches[c]:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return out


def _loss(params, x, y):
    return F.cross_entropy(functional_call(model, params, (x,)), y)


step_grads = vmap(grad(_loss))


def vectorised() -> list[dict[str, torch.Tensor]]:
    stacked = {n: start[n].expand(CLIENTS, *start[n].shape).clone().requires_grad_(False) for n in names}
    opt = torch.optim.Adam(list(stacked.values()), lr=lr, foreach=True)
    for s in range(STEPS):
        x = torch.stack([batches[c][s][0] for c in range(CLIENTS)])
        y = torch.stack([batches[c][s][1] for c in range(CLIENTS)])
        g = step_grads(stacked, x, y)
        for n in names:
            stacked[n].grad = g[n]
        opt.step()
    return [{n: stacked[n][c] for n in names} for c in range(CLIENTS)]


def _apart(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> str:
    equal = all(torch.equal(a[c][n], b[c][n]) for c in range(CLIENTS) for n in names)
    diff = max(float((a[c][n] - b[c][n]).abs().max()) for c in range(CLIENTS) for n in names)
    return f"bitwise equal {equal}, largest difference {diff:.3g}"


def main() -> None:
    torch.set_num_threads(1)
    compiled_model = torch.compile(model)
    runs = {"loop": sequential, "vmap": vectorised, "compiled": lambda: sequential(compiled_model)}
    t0 = time.perf_counter()
    results = {name: f() for name, f in runs.items()}  # warm-up, and the compile
    print(f"warm-up with the compile: {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(5):
        for name, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    print(f"{CLIENTS} clients x {STEPS} steps of {BATCH}: "
          f"min {({k: round(min(v), 3) for k, v in times.items()})} "
          f"median {({k: round(float(np.median(v)), 3) for k, v in times.items()})}")
    for name in ("vmap", "compiled"):
        print(f"{name} against loop: {_apart(results['loop'], results[name])}")


if __name__ == "__main__":
    main()
