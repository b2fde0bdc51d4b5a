"""Per-node progress inside an `up` step: on the step's live status line, or as plain notes."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cluster.cli.lifecycle import ConsoleReporter
from cluster.steps.base import SilentReporter, progress_board


class LiveReporter(SilentReporter):
    """A reporter on a terminal, keeping each status text it was given."""

    live = True

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []

    def progress(self, text: str) -> None:
        self.statuses.append(text)


def test_on_a_terminal_the_step_status_is_the_heading_then_a_line_per_node() -> None:
    reporter = LiveReporter()
    with progress_board(reporter, "copying vllm/vllm-openai (about 21 GB) from gpu-1") as board:
        board.update("gpu-2", "gpu-2: 1.2 of about 21 GB")
        board.update("gpu-3", "gpu-3: 0.9 of about 21 GB")
        board.finish("gpu-2", "gpu-2: 21 GB sent in 3 min 30 s (100 MB/s)")
    assert reporter.statuses[0] == "copying vllm/vllm-openai (about 21 GB) from gpu-1"
    assert reporter.statuses[2] == (
        "copying vllm/vllm-openai (about 21 GB) from gpu-1\n"
        "gpu-2: 1.2 of about 21 GB\n"
        "gpu-3: 0.9 of about 21 GB"
    )
    assert reporter.lines == ["gpu-2: 21 GB sent in 3 min 30 s (100 MB/s)"]


def test_off_a_terminal_the_heading_and_node_lines_are_notes() -> None:
    reporter = SilentReporter()
    with progress_board(reporter, "copying vllm/vllm-openai from gpu-1") as board:
        board.update("gpu-2", "gpu-2: 1.2 of about 21 GB")
        board.finish("gpu-2", "gpu-2: 21 GB sent in 3 min 30 s (100 MB/s)")
    assert reporter.lines == [
        "copying vllm/vllm-openai from gpu-1",
        "gpu-2: 1.2 of about 21 GB",
        "gpu-2: 21 GB sent in 3 min 30 s (100 MB/s)",
    ]


def test_the_console_reporter_is_live_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    assert not ConsoleReporter(Console(file=io.StringIO())).live
    assert ConsoleReporter(Console(file=io.StringIO(), force_terminal=True)).live
