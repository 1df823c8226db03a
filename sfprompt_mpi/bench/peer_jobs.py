"""The same FedAvg job under the peers' simulators: Flower's simulation engine and pfl-research.

``python -m sfprompt_mpi.bench _peer flower|pfl --report FILE -- RUN_FLAGS...``
(run by the ``peers`` suite with the Python that has the ``peers`` extra)
builds the job of ``python -m sfprompt_mpi.run RUN_FLAGS`` with
:class:`~.plain.PlainLoop`: the same initial model, data and partition. Each
peer then runs it through its own current, documented API, as a new user
would, in its fastest configuration on a CPU machine:

- Flower 1.42: a ``ServerApp`` running ``flwr.serverapp.strategy.FedAvg``
  (every client every round, weighted by each client's sample count, central
  evaluation only) and a ``ClientApp`` whose ``train`` is the client's round
  of the plain loop (the very batches and optimiser steps of our run), under
  ``flwr.simulation.run_simulation`` with Ray, one CPU per client actor;
- pfl 0.6: ``FederatedAveraging`` over a ``PyTorchModel`` with the local
  optimiser of the run and SGD at lr 1 centrally (the FedAvg update), users
  weighted by their sample counts, a ``SimulatedBackend``, pfl's own local
  loop (batches of the run's size, in the users' order) and its
  ``CentralEvaluationCallback``. In one process, or started by torchrun on
  several (``pfl-torchrun`` in the suite): pfl then shares the cohort's users
  and the test set among its workers and all-reduces their sums.

A round's time runs from one central evaluation to the next (training,
aggregation, evaluation), as ``round_s`` does in our runs. The report holds
the round times and the final test accuracy; under torchrun the first
worker writes it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


class _Clock:
    """Times between consecutive central evaluations."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.acc = float("nan")

    def mark(self, acc: float) -> None:
        self.marks.append(time.perf_counter())
        self.acc = acc

    def rounds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def run_flower(argv: list[str]) -> dict[str, Any]:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from .plain import PlainLoop
    loop, clock = PlainLoop(argv), _Clock()
    names, cfg = loop.layout.names, loop.cfg
    client_app, server_app = ClientApp(), ServerApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        state = msg.content["arrays"].to_torch_state_dict()
        flat_F = loop.train_client(loop.layout.flatten(state), rnd, cid)
        arrays = ArrayRecord({n: t.clone() for n, t in loop.layout.unflatten(flat_F).items()})
        metrics = MetricRecord({"num-examples": len(loop.shards[cid])})
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = arrays.to_torch_state_dict()
        acc = loop.evaluate(loop.layout.flatten({n: state[n] for n in names}))
        clock.mark(acc)
        return MetricRecord({"accuracy": acc})

    failed: list[str] = []

    class EveryReply(FedAvg):
        """FedAvg that notes a round whose clients did not all reply: Flower logs a client's error
        and aggregates the rest, which would time a round that trained nothing."""

        def aggregate_train(self, server_round: int, replies):
            replies = list(replies)
            errors = [m.error.reason for m in replies if m.has_error()]
            if errors or len(replies) < loop.clients:
                failed.append(f"round {server_round}: {len(replies) - len(errors)} of {loop.clients} Flower "
                              f"clients replied ({errors[0] if errors else 'the others never did'})")
            return super().aggregate_train(server_round, replies)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = EveryReply(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=loop.clients,
                              min_train_nodes=loop.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(loop.layout.read(loop.model)),
                       num_rounds=cfg.fed.rounds, evaluate_fn=evaluate)

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"logging_level": "ERROR", "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=loop.clients,
                   backend_config=backend)
    if failed:
        raise RuntimeError(f"the Flower job failed: {failed[0]}")
    return {"round_s": clock.rounds(), "test_acc": clock.acc}


def run_pfl(argv: list[str]) -> dict[str, Any]:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, StringMetricName, Weighted
    from pfl.model.pytorch import PyTorchModel

    from .plain import PlainLoop
    loop, clock = PlainLoop(argv), _Clock()
    cfg, module = loop.cfg, loop.model

    def loss(x, y):
        return torch.nn.functional.cross_entropy(module(x), y)

    def metrics(x, y, eval=False):
        module.eval() if eval else module.train()
        with torch.no_grad():
            correct = int((module(x).argmax(-1) == y).sum())
        return {"accuracy": Weighted(correct, len(y))}

    module.loss, module.metrics = loss, metrics
    users = list(range(loop.clients))
    data = FederatedDataset(lambda u: Dataset(raw_data=[loop.train_x[loop.shards[u]], loop.train_y[loop.shards[u]]]),
                            get_user_sampler("minimize_reuse", users))
    central = Dataset(raw_data=[loop.test_x, loop.test_y], eval_kwargs={"eval": True})
    local = torch.optim.Adam if cfg.fed.optimizer == "adam" else torch.optim.SGD
    model = PyTorchModel(module, local_optimizer_create=lambda p, lr: local(p, lr=lr, fused=True),
                         central_optimizer=torch.optim.SGD(loop.trained, lr=1.0))

    class TimedEvaluation(CentralEvaluationCallback):  # pfl's own central evaluation, shared among its workers
        def on_train_begin(self, *, model):  # the clock starts; no evaluation before training
            clock.mark(float("nan"))
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            # pfl's callback skips iteration 0 (it evaluates before training instead): here every round ends with one
            stop, got = super().after_central_iteration(aggregate_metrics, model, central_iteration=central_iteration + 1)
            return stop, self._marked(got)

        def _marked(self, got):
            clock.mark(got[StringMetricName("Central val | accuracy")].overall_value)
            return got

    backend = SimulatedBackend(training_data=data, val_data=None,  # no federated evaluation: central only
                               postprocessors=[WeightByDatapoints()])
    evaluation = NNEvalHyperParams(local_batch_size=256)
    params = NNAlgorithmParams(central_num_iterations=cfg.fed.rounds, evaluation_frequency=cfg.fed.rounds + 1,
                               train_cohort_size=loop.clients, val_cohort_size=None)
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                             model_train_params=NNTrainHyperParams(local_num_epochs=cfg.fed.split_epochs,
                                                                   local_learning_rate=cfg.fed.lr,
                                                                   local_batch_size=cfg.fed.batch_size),
                             model_eval_params=evaluation, callbacks=[TimedEvaluation(central, evaluation)])
    return {"round_s": clock.rounds(), "test_acc": clock.acc}


def peer_main(argv: list[str]) -> int:
    """``_peer flower|pfl --report FILE -- RUN_FLAGS``: one peer's run, its report written as JSON."""
    if len(argv) < 4 or argv[0] not in ("flower", "pfl") or argv[1] != "--report" or argv[3] != "--":
        print("usage: python -m sfprompt_mpi.bench _peer flower|pfl --report FILE -- RUN_FLAGS...", file=sys.stderr)
        return 2
    report = (run_flower if argv[0] == "flower" else run_pfl)(argv[4:])
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every worker has the same report: the first writes it
        Path(argv[2]).write_text(json.dumps(report) + "\n")
    return 0
