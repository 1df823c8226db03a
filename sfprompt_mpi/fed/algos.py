"""What each ``--algo`` trains, where, and how a round runs.

One table, read by the model builder, the client, the server and the cost
accounting, so an algorithm is described once:

================  =====  =======  ===============================  ==========
algo              split  prompts  clients train and exchange       server
================  =====  =======  ===============================  ==========
sfprompt          yes    yes      prompts + tail (+ head)          frozen body
sfl-full          yes    no       head + tail (everything)         trains body
sfl-linear        yes    no       classifier                       frozen body
fl-full           no     no       the whole model                  aggregates
fl-linear         no     no       classifier                       aggregates
fedpeft-prompt    no     yes      prompts + classifier             aggregates
fedpeft-bias      no     no       every bias + classifier          aggregates
fedpeft-adapter   no     no       bottleneck adapters + classifier aggregates
================  =====  =======  ===============================  ==========

*Split* algorithms train through the server (head here, body there, tail
here); the others hold the whole model on the client and talk to the server
only to receive the global parameters and send their update. Only SFPrompt
runs the local-loss phase and EL2N pruning (``fed.local_loss``,
``fed.keep_ratio``); every other algorithm trains ``fed.split_epochs``
epochs over all of its samples at ``fed.lr``, as its paper does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ALGOS, Config


@dataclass(frozen=True)
class Algo:
    name: str
    split: bool             # head/tail on the client, body on the server
    prompts: bool           # the model carries soft prompts (model.prompt_len of them)
    trains: str             # "prompts+tail", "all", "classifier", "prompts+classifier", "bias", "adapter"
    sfprompt_phases: bool   # local-loss update and EL2N pruning apply
    server_trains_body: bool = False
    adapters: bool = False


_TABLE = {
    "sfprompt": Algo("sfprompt", True, True, "prompts+tail", True),
    "sfl-full": Algo("sfl-full", True, False, "all", False, server_trains_body=True),
    "sfl-linear": Algo("sfl-linear", True, False, "classifier", False),
    "fl-full": Algo("fl-full", False, False, "all", False),
    "fl-linear": Algo("fl-linear", False, False, "classifier", False),
    "fedpeft-prompt": Algo("fedpeft-prompt", False, True, "prompts+classifier", False),
    "fedpeft-bias": Algo("fedpeft-bias", False, False, "bias", False),
    "fedpeft-adapter": Algo("fedpeft-adapter", False, False, "adapter", False, adapters=True),
}
if set(_TABLE) != set(ALGOS):
    raise RuntimeError("config.ALGOS and the algorithm table disagree")


def algo_of(cfg: Config | str) -> Algo:
    """The table row of ``cfg.fed.algo`` (or of an algorithm name)."""
    return _TABLE[cfg if isinstance(cfg, str) else cfg.fed.algo]


def prompt_len(cfg: Config) -> int:
    """Soft prompt tokens the model of this run carries (0 for algorithms without prompts)."""
    return cfg.model.prompt_len if algo_of(cfg).prompts else 0


def uses_sfprompt_phases(cfg: Config) -> tuple[bool, float]:
    """(run the local-loss phase, keep ratio of EL2N pruning) as this run applies them."""
    if algo_of(cfg).sfprompt_phases:
        return cfg.fed.local_loss and cfg.fed.local_epochs > 0, cfg.fed.keep_ratio
    return False, 1.0


def build_run_model(cfg: Config, num_classes: int, *, quiet: bool = False, meta: bool = False):
    """The model this run trains: the backbone with the algorithm's prompts or adapters."""
    from ..model.split import build_model
    algo = algo_of(cfg)
    return build_model(cfg.model, num_classes, cfg.run.seed, quiet=quiet, prompt_len=prompt_len(cfg),
                       adapters=algo.adapters, meta=meta)
