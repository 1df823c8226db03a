"""Makes tests/mpi importable: its launch helpers serve every test that starts mpiexec."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
