"""Error types for expected failures: each names where it happened, what failed and the fix.

The CLI turns any `VclusterError` into one line per problem (never a traceback) and the
error's exit code. Anything else escaping to the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in the README."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    UNHEALTHY = 3


class VclusterError(Exception):
    """An expected failure: `where` (a host, a file:line) + what went wrong + how to fix it."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    def one_line(self) -> str:
        """Render as `where: message (fix: ...)`."""
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} (fix: {self.fix})" if self.fix else text

    def lines(self) -> list[str]:
        """One line per problem; most errors are one problem."""
        return [self.one_line()]

    def __str__(self) -> str:
        return self.one_line()


@dataclass(frozen=True)
class Problem:
    """One problem found in a file: where it is, which key, what is wrong."""

    location: str  # "inventory/prod.yaml:12"
    key_path: str  # "nodes[1].address"
    message: str

    def one_line(self) -> str:
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{self.location}:{key} {self.message}"


class InventoryError(VclusterError):
    """The inventory is invalid; carries every problem found, not only the first."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(p.one_line() for p in problems))

    def lines(self) -> list[str]:
        return [p.one_line() for p in self.problems]


class UsageError(VclusterError):
    """A bad command-line choice (an unknown node name, a conflicting option)."""

    exit_code = ExitCode.BAD_INPUT


class NotYetAvailable(VclusterError):
    """A command whose issue has not landed yet."""
