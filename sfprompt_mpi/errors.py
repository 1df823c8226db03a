"""The one exception type for mistakes a user can cause.

Every CLI entry point catches :class:`UserError` once (``cli.main_guard``),
prints its message as a single line and exits with code 2. Everything else is
a bug or a fault and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix: bad config, missing data, wrong world size.

    The message must name the problem and, where there is one, the fix, in a
    single line.
    """


EXIT_RUN_STOPPED = 3


class RunStopped(Exception):
    """The run cannot go on, through no bug and no user mistake: e.g. fewer
    clients than ``--min-clients`` survived a round and its retries.

    ``cli.main_guard`` prints the message as one line (``[r00] stopped: ...``) and
    ends the job with exit code 3 (under MPI by aborting, so that no rank is
    left waiting). The completed rounds stay in the checkpoint and the HDF5
    files, so the run can be continued with ``--resume``.
    """


EXIT_CONTINUE = 4
"""Exit code of a run that stopped cleanly to be continued (a signal, or its time budget): every
rank exits with it after the round in progress is checkpointed; the job scripts requeue on it."""
