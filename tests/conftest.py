"""Makes tests/mpi importable: its launch helpers serve every test that starts mpiexec.

Every test marked ``mpi`` or ``slurm`` is also ``slow``: the fast tier
(``-m "not slow"``) starts no launcher.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "mpi"))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per CPU, at most 4: an MPI test starts 3-5 ranks of its own."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("mpi") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
    # The Slurm tests first: under pytest-xdist their file is one work unit, mostly spent waiting on
    # Slurm's timers, which the other worker fills with the rest of the suite.
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)
