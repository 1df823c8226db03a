"""Optimiser steps of the offline default model: torch's foreach form against its fused form.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/experiments/client/fused_step.py [STEPS]

Trains the micro ViT (``vit_micro_patch8_32``, 10 classes, one thread) on one fixed batch of 32
for STEPS steps (default 40, after 5 of warm-up), once per optimiser form, and prints the mean
forward, backward and optimiser-step times, and whether the fused form's parameters after the
steps equal the foreach form's bitwise (else the largest difference). Adam at 3e-3 with weight
decay 0.01, SGD at 0.01 with and without momentum 0.9. Three rounds of all forms, alternating.
"""

import sys
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from sfprompt_mpi.model.vit import SMALL_MODELS

torch.set_num_threads(1)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
FORMS = {
    "adam": lambda p, how: torch.optim.Adam(p, lr=3e-3, weight_decay=0.01, **how),
    "sgd momentum": lambda p, how: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.01, **how),
    "sgd": lambda p, how: torch.optim.SGD(p, lr=0.01, **how),
}
x, y = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 10


def run(make, how):
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL_MODELS["vit_micro_patch8_32"], num_classes=10)
    opt = make(list(model.parameters()), how)
    spent = [0.0, 0.0, 0.0]
    for step in range(5 + STEPS):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if step >= 5:
            for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                spent[i] += dt / STEPS * 1e3
    return spent, torch.cat([p.detach().flatten() for p in model.parameters()])


for rnd in range(3):
    for name, make in FORMS.items():
        (f1, b1, s1), v1 = run(make, {"foreach": True})
        (f2, b2, s2), v2 = run(make, {"fused": True})
        same = "bitwise equal" if torch.equal(v1, v2) else f"largest difference {(v1 - v2).abs().max().item():.1e}"
        print(f"{name:13s} forward {f1:5.1f}/{f2:5.1f}  backward {b1:5.1f}/{b2:5.1f}  step foreach {s1:5.2f} ms, "
              f"fused {s2:5.2f} ms; after {STEPS} steps: {same}", flush=True)
