"""The one kind of error a user can fix, and the one way it is reported.

Every check of user input (flags, presets, data files, hostfiles, configs, checkpoint folders)
raises :class:`UsageError` (or a subclass) with a message that names the input and the fix; the
entry points turn it into one line on stderr and exit status 2 with :func:`fail`.
"""
from __future__ import annotations

import sys
from typing import NoReturn


class UsageError(ValueError):
    """Bad user input; reported as one line with exit status 2."""


def fail(msg: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback, the given exit status."""
    print(f"dtlab: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)
