"""Makes tests/mpi importable: its launch helpers serve every test that starts mpiexec.

Every test marked ``mpi`` or ``slurm`` is also ``slow``: the fast tier
(``-m "not slow"``) starts no launcher.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "mpi"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("mpi") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
