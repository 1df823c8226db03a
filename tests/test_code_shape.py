"""The code stays small enough to read in one sitting: no class in sfprompt_mpi/ above 250 lines,
no function above 60 (docstrings included), and the runtime never asks for an algorithm by name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from sfprompt_mpi.algorithms import ALGOS

PACKAGE = Path(__file__).resolve().parents[1] / "sfprompt_mpi"
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 60


def _sizes():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node, node.end_lineno - node.lineno + 1


def test_no_class_or_function_is_too_long_to_read_in_one_sitting():
    too_long = [f"{path}:{node.lineno} {node.name} ({lines} lines)" for path, node, lines in _sizes()
                if lines > (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES)]
    assert not too_long, too_long


#: Files that may name an algorithm: the plug-ins and their registry, the config (its default ``--algo``) and the
#: ``cost`` report, whose subject is SFPrompt against FedAvg full fine-tuning, as in the paper, and the ``limit``
#: benchmark, whose default subjects are the same two (its plain loop reads the algorithm's settings, not its name),
#: and the ``peers`` benchmark, whose subject is the FedAvg job the peers run.
MAY_NAME = {"config.py", "cost.py", "bench/limit.py", "bench/peers.py"}


def test_only_the_algorithm_modules_and_the_registry_name_an_algorithm():
    # The runtime, server, client, cost model and analysis work for any registered algorithm.
    names = re.compile("|".join(re.escape(f'"{a}"') for a in ALGOS))
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "algorithms" or str(rel) in MAY_NAME:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if names.search(line) and not line.lstrip().startswith("#"):
                outside.append(f"{rel}:{i}: {line.strip()}")
    assert not outside, outside
