"""Progress on a terminal: lines printed for good above a block of live lines redrawn in place."""

from __future__ import annotations

import io

from cluster.cli.live import TerminalLines
from cluster.progress import LiveOutput, board_for

UP_TWO_AND_CLEAR = "\r\x1b[2A\x1b[J"


def test_a_block_is_drawn_then_redrawn_in_place() -> None:
    stream = io.StringIO()
    lines = TerminalLines(stream, width=40)
    lines.show(["node-1: 0.2 of 2.1 GB", "node-2: 0.1 of 2.1 GB"])
    lines.show(["node-1: 0.4 of 2.1 GB", "node-2: 0.3 of 2.1 GB"])
    assert stream.getvalue() == (
        "node-1: 0.2 of 2.1 GB\nnode-2: 0.1 of 2.1 GB\n"
        + UP_TWO_AND_CLEAR
        + "node-1: 0.4 of 2.1 GB\nnode-2: 0.3 of 2.1 GB\n"
    )


def test_a_line_printed_for_good_goes_above_the_block() -> None:
    stream = io.StringIO()
    lines = TerminalLines(stream, width=40)
    lines.show(["node-1: 0.2 of 2.1 GB", "node-2: 0.1 of 2.1 GB"])
    stream.truncate(0)
    stream.seek(0)
    lines("node-1: 2.1 GB sent in 40 s")
    assert stream.getvalue() == (
        UP_TWO_AND_CLEAR
        + "node-1: 2.1 GB sent in 40 s\n"
        + "node-1: 0.2 of 2.1 GB\nnode-2: 0.1 of 2.1 GB\n"
    )


def test_an_empty_block_erases_the_old_one_and_draws_nothing() -> None:
    stream = io.StringIO()
    lines = TerminalLines(stream, width=40)
    lines.show(["a", "b"])
    lines.show([])
    lines("done")
    assert stream.getvalue() == "a\nb\n" + UP_TWO_AND_CLEAR + "done\n"


def test_live_lines_are_cut_to_the_terminal_width() -> None:
    stream = io.StringIO()
    TerminalLines(stream, width=12).show(["node-1: 1.2 of 2.1 GB"])
    assert stream.getvalue() == "node-1: 1.…\n"


def test_a_terminal_gets_a_live_board() -> None:
    lines = TerminalLines(io.StringIO(), width=80)
    assert isinstance(lines, LiveOutput)
    assert board_for(lines).live
