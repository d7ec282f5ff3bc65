"""Errors a person can act on: one message, the key or file:line, the fix. No traceback."""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


class UserError(Exception):
    """Bad input from the user (config, data, paths). Printed as one message; exit code 2."""

    exit_code = 2


class Preempted(UserError):
    """The run stopped on SIGTERM or SIGUSR1 after saving a checkpoint at its last step."""

    exit_code = 143  # 128 + SIGTERM: a scheduler reads it as "terminated"; the checkpoint is complete

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        self.signum = signum  # the signal that stopped the run, when this process received it


def did_you_mean(word: str, choices: Iterable[str]) -> Optional[str]:
    """The closest choice to a misspelled word, or None."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestion(word: str, choices: Iterable[str], fmt: str = "{}") -> str:
    """' Did you mean X?' or '' when nothing is close."""
    best = did_you_mean(word, choices)
    return f" Did you mean {fmt.format(best)}?" if best else ""


def fail(message: str, code: int = 2) -> "NoReturn":  # noqa: F821
    """Print one error message to stderr and exit."""
    import sys

    print(f"fttool: {'error: ' if code else ''}{message}", file=sys.stderr)
    raise SystemExit(code)
