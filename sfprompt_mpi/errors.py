"""The one exception type for mistakes a user can cause.

``run.py`` (and every other CLI entry point) catches :class:`UserError` once,
prints its message as a single line and exits with code 2. Everything else is
a bug or a fault and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix: bad config, missing data, wrong world size.

    The message must name the problem and, where there is one, the fix, in a
    single line.
    """
