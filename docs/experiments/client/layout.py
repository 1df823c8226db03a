"""Per-client parameter plumbing on the micro ViT: the dict forms against the kept flat views (issue 20).

python docs/experiments/client/layout.py   (from the repository root, PYTHONPATH=$PWD)

Times, in microseconds per call (min of 5 x 300, one thread): what a client round did before
(``Layout.flatten`` of the model's ``named_parameters`` for its update, ``Layout.write`` of
``Layout.unflatten`` for the global vector) and what it does now (``Layout.flatten_model``,
``Layout.load`` on the views kept per model); and what a new Adam costs a client against the
trainer's renewed one (``renew_optimizer``).
"""
import timeit

import torch

from sfprompt_mpi.algorithms import build_algorithm
from sfprompt_mpi.config import parse_config
from sfprompt_mpi.fed.state import Layout
from sfprompt_mpi.fed.training import make_optimizer, renew_optimizer

torch.set_num_threads(1)
cfg = parse_config(["--algo", "fl-full"])
algo = build_algorithm(cfg)
model = algo.build_model(10, quiet=True)
layout = Layout(model, algo.trained_names(model))
flat_F = layout.flatten_model(model)
params = [dict(model.named_parameters())[n] for n in layout.names]


def us(f, number=300):
    return min(timeit.repeat(f, number=number, repeat=5)) / number * 1e6


def new_adam():
    opt = make_optimizer(params, cfg, 3e-3)
    opt.step()


kept = make_optimizer(params, cfg, 3e-3)
for p in params:
    p.grad = torch.zeros_like(p)
kept.step()


def renewed_adam():
    renew_optimizer(kept)
    kept.step()


print(f"{len(params)} tensors, {layout.numel} values")
print(f"update out:   flatten(named_parameters) {us(lambda: layout.flatten(dict(model.named_parameters()))):7.1f} us"
      f"   flatten_model {us(lambda: layout.flatten_model(model)):7.1f} us")
print(f"global in:    write(unflatten)          {us(lambda: layout.write(model, layout.unflatten(flat_F))):7.1f} us"
      f"   load          {us(lambda: layout.load(model, flat_F)):7.1f} us")
print(f"Adam + 1 step: new                      {us(new_adam, 50):7.1f} us   renewed       {us(renewed_adam, 50):7.1f} us")
