"""The one error type of the CLI: what went wrong and what to do, printed as one line.

Commands raise :class:`CliError` for everything a user can cause or fix (a typo in a manifest, a
cluster that is down, a job that does not exist); ``main`` prints it as
``error: <what> — <what to do>`` and exits with its code. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: ``what`` happened; ``todo`` says how to fix it."""

    def __init__(self, what: str, todo: str = "", code: int = EXIT_ERROR) -> None:
        super().__init__(what)
        self.what = what
        self.todo = todo
        self.code = code

    def __str__(self) -> str:
        return f"{self.what} — {self.todo}" if self.todo else self.what
