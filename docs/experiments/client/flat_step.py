"""An optimiser step over one flat tensor against torch's foreach step over the parameters.

``python docs/experiments/client/flat_step.py``: the micro ViT (``fl-full``), batches of 32, 30
steps each way, one thread: the step's median time per-tensor (``make_optimizer``), with the
parameters made views of one flat tensor that a twin optimiser steps (gradients concatenated into
its gradient), and whether both end bitwise equal. Tried and not kept (docs/benchmarks.md, twelfth
session).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from sfprompt_mpi.config import parse_config
from sfprompt_mpi.fed.training import make_optimizer
from sfprompt_mpi.model.split import build_model


def main() -> None:
    torch.set_num_threads(1)
    cfg = parse_config(["--algo", "fl-full"])
    flat_model = build_model(cfg.model, 10, 0, quiet=True)
    each_model = copy.deepcopy(flat_model)
    flat_params, each_params = list(flat_model.parameters()), list(each_model.parameters())
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in flat_params]))
    offset = 0
    for p in flat_params:  # the parameters become views of the flat tensor
        p.data = flat.data[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    twin, each = make_optimizer([flat], cfg, 1e-3), make_optimizer(each_params, cfg, 1e-3)
    grad = torch.empty_like(flat)

    def flat_step() -> None:
        torch.cat([p.grad.reshape(-1) for p in flat_params], out=grad)
        flat.grad = grad
        twin.step()

    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for _ in range(2):
        for name, model, step, params in (("per tensor", each_model, each.step, each_params),
                                          ("flat", flat_model, flat_step, flat_params)):
            steps, passes = [], []
            for _ in range(30):
                for p in params:
                    p.grad = None
                t0 = time.perf_counter()
                F.cross_entropy(model(x), y).backward()
                t1 = time.perf_counter()
                with torch.no_grad():
                    step()
                steps.append(time.perf_counter() - t1)
                passes.append(t1 - t0)
            print(f"{name}: step median {sorted(steps)[15] * 1e3:.2f} ms; "
                  f"forward and backward {sorted(passes)[15] * 1e3:.1f} ms")
    print("bitwise equal:", all(torch.equal(a, b) for a, b in zip(flat_params, each_params)))


if __name__ == "__main__":
    main()
