"""Progress lines on this process's stderr: a block of live lines redrawn in place on a terminal,
plain lines anywhere else (a CI log, a file)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

import click

from cluster.progress import Progress

_UP_AND_CLEAR = "\r\x1b[{count}A\x1b[J"  # to the block's first line, then erase to the end


class TerminalLines:
    """Lines printed for good, with a block of live lines kept below them and redrawn in place.

    Live lines are cut to the terminal's width: a wrapped line would throw off the count of
    lines to go back up.
    """

    def __init__(self, stream: TextIO, width: int | None = None) -> None:
        self._stream = stream
        self._width = width
        self._block: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self._stream.write(self._erase() + line + "\n" + self._draw())
            self._stream.flush()

    def show(self, lines: Sequence[str]) -> None:
        with self._lock:
            erase = self._erase()
            width = self._width or shutil.get_terminal_size().columns
            self._block = [_fit(line, width - 1) for line in lines]
            self._stream.write(erase + self._draw())
            self._stream.flush()

    def _erase(self) -> str:
        return _UP_AND_CLEAR.format(count=len(self._block)) if self._block else ""

    def _draw(self) -> str:
        return "".join(line + "\n" for line in self._block)


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


def _plain(line: str) -> None:
    click.echo(line, err=True)


def progress_output() -> Progress:
    """The progress callback for stderr: live lines on a terminal, plain lines otherwise."""
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        return TerminalLines(sys.stderr)
    return _plain
