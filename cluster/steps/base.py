"""A step is a title and a function of the shared context; `run_steps` runs them in order.

Each step opens one status line (through the `Reporter`), may update it while it waits, and
closes it with its outcome and duration. A step that raises stops the run; the error keeps its
host and fix, and the reporter shows which step it stopped in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from cluster.progress import ProgressBoard

C = TypeVar("C")


class Reporter(Protocol):
    """Where progress goes: the CLI draws it live, tests record it.

    `live`: `progress` redraws its text in place (a terminal); otherwise progress that matters
    in a log (bytes streamed per node) goes to `note`, at a bounded pace.
    """

    live: bool

    def start(self, title: str) -> None: ...

    def progress(self, text: str) -> None: ...

    def finish(self, title: str, ok: bool, detail: str, duration_s: float) -> None: ...

    def note(self, text: str) -> None: ...


class SilentReporter:
    """A reporter that keeps what it was told, for tests and library use."""

    live = False

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, title: str) -> None:
        pass

    def progress(self, text: str) -> None:
        pass

    def finish(self, title: str, ok: bool, detail: str, duration_s: float) -> None:
        self.lines.append(f"{'ok' if ok else 'FAILED'} {title}: {detail}")

    def note(self, text: str) -> None:
        self.lines.append(text)


def progress_board(reporter: Reporter, heading: str) -> ProgressBoard:
    """A board for per-node progress under `heading`: the step's live status on a terminal
    (the heading, then a line per node), plain notes otherwise."""
    if not reporter.live:
        reporter.note(heading)
        return ProgressBoard(reporter.note)

    def show(lines: Sequence[str]) -> None:
        reporter.progress("\n".join([heading, *lines]))

    show([])
    return ProgressBoard(reporter.note, show)


@dataclass(frozen=True)
class Step(Generic[C]):
    """One named action; `run` returns a one-line detail for the status line."""

    title: str
    run: Callable[[C], str]


def run_steps(steps: Sequence[Step[C]], context: C, reporter: Reporter) -> None:
    """Run `steps` in order, each with its own status line; stop at the first that raises."""
    for step in steps:
        reporter.start(step.title)
        started = time.monotonic()
        try:
            detail = step.run(context)
        except BaseException:
            reporter.finish(step.title, False, "", time.monotonic() - started)
            raise
        reporter.finish(step.title, True, detail, time.monotonic() - started)


def wait_until(
    condition: Callable[[], str | None],
    *,
    timeout_s: float,
    interval_s: float,
    reporter: Reporter,
    waiting_for: str,
) -> str | None:
    """Poll `condition` until it returns None (done) or `timeout_s` passes.

    `condition` returns None when satisfied, or a short text of what is still missing, shown on
    the status line. Returns None on success, or the last missing text on timeout.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        missing = condition()
        if missing is None:
            return None
        elapsed = time.monotonic() - started
        if time.monotonic() >= deadline:
            return missing
        reporter.progress(f"{waiting_for}: {missing} ({elapsed:.0f}s of {timeout_s:.0f}s)")
        time.sleep(interval_s)
