"""Benchmarks: each suite measures the project against a limit in the same run.

    python -m sfprompt_mpi.bench transport [--json OUT]   # starts mpiexec -n 2 itself
    python -m sfprompt_mpi.bench server
    python -m sfprompt_mpi.bench round                    # reference run + mpiexec -n 3 run
    python -m sfprompt_mpi.bench scale --clients 50,500,5000
    python -m sfprompt_mpi.bench wire
    python -m sfprompt_mpi.bench limit                    # vs a plain PyTorch loop, 1 process and 1 per core
    python -m sfprompt_mpi.bench peers                    # vs Flower and pfl-research (the peers extra)

Every suite prints a table, then its key ratio as the last line, and with
``--json OUT`` writes the rows, the key ratio and the machine as JSON. Results
and commands: ``docs/benchmarks.md``.
"""
