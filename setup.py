"""The exact sum's C loops (sfprompt_mpi/fed/_exactsum.c); everything else is in setup.cfg.

The extension is optional: without a C compiler the install still succeeds and
the exact sum runs its torch version (the same limbs and means, 3-13x slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sfprompt_mpi.fed._exactsum", ["sfprompt_mpi/fed/_exactsum.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off"],  # no fused multiply-add: the torch rounding
                             optional=True)])
