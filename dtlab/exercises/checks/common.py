"""What the checks share: how a difference and an action list are described."""
from __future__ import annotations

import traceback
from pathlib import Path


def _first_diff(got, expected) -> str:
    bad = (got != expected).nonzero()
    i = tuple(bad[0].tolist()) if len(bad) else ()
    i = i[0] if len(i) == 1 else i
    return f"{len(bad)} element(s) differ, first at index {i}: expected {expected[i].item():g}, " \
           f"got {got[i].item():g}"


def _quiet(text: str) -> None:
    """The default ``note``: where a check would say which case it is in (a distributed worker
    writes it to a file, so a crash report can name the case)."""



def _first_difference(got: list, want: list) -> int:
    """Index of the first action where two lists differ (one may be longer)."""
    n = max(len(got), len(want))
    return next(i for i in range(n) if (got[i] if i < len(got) else None) !=
                (want[i] if i < len(want) else None))


def _action_diff(where: str, got: list, want: list, hint: str = "") -> str:
    i = _first_difference(got, want)
    line = f"{where}: action {i} should be {want[i] if i < len(want) else 'nothing'}, got " \
           f"{got[i] if i < len(got) else 'nothing'}"
    if hint:
        return f"{line}: {hint}"
    return line + (f"; expected {want}" if len(want) <= 24 else "")


def _where(e: BaseException, path: str, code: bool = True) -> str:
    """The innermost line of the learner's file in the traceback."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if Path(f.filename).resolve() == Path(path).resolve()]
    if not frames:
        return ""
    return f" (your file, line {frames[-1].lineno}" + (f": {frames[-1].line})" if code else ")")


def _describe(e: BaseException, path: str) -> str:
    if isinstance(e, NotImplementedError):
        return f"not done yet: {e}{_where(e, path, code=False)}"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}" \
           f"{_where(e, path)}"
