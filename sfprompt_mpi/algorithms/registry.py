"""The algorithm registry: ``--algo`` name -> where its class lives. Imports nothing.

The config reads the names from here (``--algo``'s choices) before torch is
imported; :func:`sfprompt_mpi.algorithms.algorithm_class` imports a class
when it is asked for. Adding an algorithm is one module and one line here.
"""

#: ``--algo`` name -> "module:Class", in the order tables list them. A module name without a dot is
#: one of this package's; a dotted one is imported as it stands (an algorithm kept outside the package).
REGISTRY: dict[str, str] = {
    "sfprompt": "sfprompt:SFPrompt",
    "fl-full": "fedavg:FedAvgFull",
    "fl-linear": "fedavg:FedAvgLinear",
    "fedpeft-prompt": "fedpeft:FedPEFTPrompt",
    "fedpeft-bias": "fedpeft:FedPEFTBias",
    "fedpeft-adapter": "fedpeft:FedPEFTAdapter",
    "sfl-full": "splitfed:SplitFedFull",
    "sfl-linear": "splitfed:SplitFedLinear",
    "mergesfl": "mergesfl:MergeSFL",
    "fedlora": "lora:FedLoRA",
    "hetlora": "lora:HetLoRA",
    "legend": "legend:Legend",
}
#: The algorithms whose models carry peft's LoRA: their ranks import peft and with it transformers
#: (more memory per rank, see ``world.rank_floor_gb``; tests/test_algos.py checks the set).
PEFT_ALGOS = frozenset({"fedlora", "hetlora", "legend"})
#: The registered names (a live view: ``--algo``'s choices follow the registry).
ALGOS = REGISTRY.keys()
#: The algorithms of SFPrompt's Figure 2 (accuracy as one training set is divided among more clients):
#: ``python -m sfprompt_mpi.table --clients ...`` runs these unless ``--algos`` says otherwise.
FIGURE2_ALGOS = ("sfprompt", "fl-full", "fl-linear")
