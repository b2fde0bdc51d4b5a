"""What every command shares: argument declarations and the mapping of errors to exit codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from cluster.errors import ExitCode, VclusterError

INVENTORY = click.argument("inventory", type=click.Path(path_type=Path))
JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def stderr_console() -> Console:
    """Where progress goes: wrapped to a terminal's width, or whole lines in a log (a wrapped
    line is lost to `grep`)."""
    console = Console(stderr=True)
    console.soft_wrap = not console.is_terminal
    return console


def fail(lines: list[str], code: ExitCode) -> None:
    """Print each line as an error on stderr and exit with code."""
    for line in lines:
        click.secho(f"error: {line}", fg="red", err=True)
    sys.exit(int(code))


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line each and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except VclusterError as error:
            fail(error.lines(), error.exit_code)
        except KeyboardInterrupt:
            fail(["interrupted"], ExitCode.FAILED)

    return wrapper
