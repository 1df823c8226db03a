"""``--json OUT`` for every CLI: one writer, one error line when OUT cannot be written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UserError


def write_json(dest: str | os.PathLike, data: Any, **dumps: Any) -> None:
    """``data`` as JSON (``json.dumps`` keywords in ``dumps``) to the file ``dest``, or stdout for ``-``.

    Missing parent directories are created; a file that cannot be written is a
    :class:`UserError` naming it, not a traceback after the work is done.
    """
    text = json.dumps(data, **dumps) + "\n"
    if str(dest) == "-":
        sys.stdout.write(text)
        return
    path = Path(dest)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write --json {dest}: {exc.strerror or exc}") from None
