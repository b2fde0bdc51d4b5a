"""Progress meters, their wording and their pacing: figures from given (time, amount) samples."""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence

import pytest

from cluster.progress import (
    LiveOutput,
    Meter,
    PlainCadence,
    ProgressBoard,
    Transfer,
    board_for,
    bytes_of,
    describe_transfer,
    format_bytes,
    format_duration,
    metered,
    prefixed,
)

GB = 1e9
MB = 1e6


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Shown:
    """A live output that records what it was told."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.blocks: list[list[str]] = []

    def __call__(self, line: str) -> None:
        self.said.append(line)

    def show(self, lines: Sequence[str]) -> None:
        self.blocks.append(list(lines))


# --- wording --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (9_400, "9.4 kB"),
        (134_000, "134 kB"),
        (45_300_000, "45 MB"),
        (132_715_776, "133 MB"),
        (2_100_000_000, "2.1 GB"),
        (21_400_000_000, "21 GB"),
    ],
)
def test_sizes_are_in_decimal_units_with_two_or_three_figures(count: float, text: str) -> None:
    assert format_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (8, "8 s"), (59.6, "1 min"), (125, "2 min 5 s"), (3720, "1 h 2 min")],
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_an_amount_shares_the_unit_of_its_total_when_that_reads_well() -> None:
    assert bytes_of(1.2 * GB, 2.1 * GB) == "1.2 of 2.1 GB"
    assert bytes_of(0.1 * GB, 2.1 * GB) == "0.1 of 2.1 GB"
    assert bytes_of(45 * MB, 2.1 * GB) == "45 MB of 2.1 GB"
    assert bytes_of(1.2 * GB, None) == "1.2 GB"


def test_an_estimated_total_says_about_and_is_dropped_once_passed() -> None:
    assert bytes_of(1.2 * GB, 2.1 * GB, estimated=True) == "1.2 of about 2.1 GB"
    assert bytes_of(2.2 * GB, 2.1 * GB, estimated=True) == "2.2 GB"


# --- the meter ------------------------------------------------------------------------------------


def steady(meter: Meter, start: float, end: float, per_second: float, every: float = 0.5) -> None:
    """Feed `meter` `per_second` from `start` to `end`, a sample every `every` seconds."""
    steps = round((end - start) / every)
    for step in range(1, steps + 1):
        meter.add(start + step * every, per_second * every)


def test_no_rate_and_no_time_left_before_a_second_of_samples() -> None:
    meter = Meter(0.0, total=2.1 * GB)
    meter.add(0.5, 20 * MB)
    assert meter.rate(0.5) is None
    assert meter.seconds_left(0.5) is None
    assert describe_transfer(meter, 0.5) == "20 MB of 2.1 GB"


def test_a_steady_stream_gives_its_rate_and_the_time_left_at_that_rate() -> None:
    meter = Meter(0.0, total=2.1 * GB)
    steady(meter, 0.0, 20.0, 45 * MB)
    assert meter.rate(20.0) == pytest.approx(45 * MB)
    assert meter.seconds_left(20.0) == pytest.approx((2.1 * GB - 900 * MB) / (45 * MB))
    assert meter.fraction() == pytest.approx(900 / 2100)
    assert describe_transfer(meter, 20.0) == "0.9 of 2.1 GB, 45 MB/s, 27 s left"


def test_the_rate_is_over_the_last_ten_seconds_not_the_whole_transfer() -> None:
    meter = Meter(0.0, total=4 * GB)
    steady(meter, 0.0, 10.0, 100 * MB)
    steady(meter, 10.0, 20.0, 20 * MB)
    assert meter.rate(20.0) == pytest.approx(20 * MB)
    assert meter.average_rate(20.0) == pytest.approx(60 * MB)


def test_time_left_is_rounded_up_and_not_shown_once_done() -> None:
    meter = Meter(0.0, total=100 * MB)
    steady(meter, 0.0, 2.0, 45 * MB)
    assert describe_transfer(meter, 2.0) == "90 of 100 MB, 45 MB/s, 1 s left"
    meter.add(2.5, 10 * MB)
    assert describe_transfer(meter, 2.5) == "100 of 100 MB, 40 MB/s"


def test_a_stalled_stream_s_rate_falls_to_zero_and_its_time_left_is_unknown() -> None:
    meter = Meter(0.0, total=2.1 * GB)
    steady(meter, 0.0, 20.0, 20 * MB)
    assert meter.rate(25.0) == pytest.approx(10 * MB)  # 5 s of 20 MB/s in the last 10 s
    assert meter.rate(31.0) == 0
    assert meter.seconds_left(31.0) is None
    assert describe_transfer(meter, 31.0) == "0.4 of 2.1 GB, 0 B/s"


def test_without_a_total_there_is_a_rate_but_no_fraction_nor_time_left() -> None:
    meter = Meter(0.0)
    steady(meter, 0.0, 4.0, 300 * MB)
    assert describe_transfer(meter, 4.0) == "1.2 GB, 300 MB/s"
    assert meter.fraction() is None


def test_an_estimated_total_s_time_left_is_about_and_goes_once_passed() -> None:
    meter = Meter(0.0, total=2.0 * GB)
    steady(meter, 0.0, 10.0, 100 * MB)
    assert describe_transfer(meter, 10.0, estimated=True) == (
        "1.0 of about 2.0 GB, 100 MB/s, about 10 s left"
    )
    steady(meter, 10.0, 21.0, 100 * MB)
    assert describe_transfer(meter, 21.0, estimated=True) == "2.1 GB, 100 MB/s"
    assert meter.fraction() == 1.0


def test_a_long_fast_stream_keeps_few_samples() -> None:
    meter = Meter(0.0)
    steady(meter, 0.0, 600.0, 1 * GB, every=0.01)
    assert len(meter._samples) <= 2 * 10.0 / 0.2 + 2
    assert meter.rate(600.0) == pytest.approx(1 * GB)


# --- pacing ---------------------------------------------------------------------------------------


def test_a_plain_line_is_due_first_then_every_ten_seconds_or_each_tenth() -> None:
    cadence = PlainCadence()
    moments = [(0.0, 0.0), (1.0, 0.05), (3.0, 0.12), (5.0, 0.15), (13.1, 0.18), (13.5, 0.5),
               (14.0, 0.55), (15.0, 0.6), (16.0, 1.0)]  # fmt: skip
    due = [now for now, fraction in moments if cadence.due(now, fraction)]
    assert due == [0.0, 3.0, 13.1, 13.5, 15.0, 16.0]


def test_without_a_fraction_a_plain_line_is_due_every_ten_seconds() -> None:
    cadence = PlainCadence()
    assert [now for now in range(0, 35) if cadence.due(float(now))] == [0, 10, 20, 30]


def test_off_a_terminal_two_nodes_get_their_own_bounded_plain_lines() -> None:
    clock, said = Clock(0.0), []
    board = ProgressBoard(said.append, clock=clock)
    for tick in range(1, 201):  # 20 s, ten updates a second each
        clock.now = tick / 10
        board.update("node-1", f"node-1 at {tick}", fraction=tick / 200)
        board.update("node-2", f"node-2 at {tick}", fraction=tick / 400)
    board.finish("node-1", "node-1 done")
    assert [line for line in said if line.startswith("node-1")] == [
        *(f"node-1 at {tick}" for tick in (1, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200)),
        "node-1 done",
    ]
    assert [line for line in said if line.startswith("node-2")] == [
        f"node-2 at {tick}" for tick in (1, 40, 80, 120, 160, 200)
    ]


def test_on_a_terminal_the_block_is_redrawn_at_most_four_times_a_second() -> None:
    clock, output = Clock(0.0), Shown()
    board = board_for(output, clock=clock)
    assert board.live
    for tick in range(0, 20):  # 2 s, ten updates a second
        clock.now = tick / 10
        board.update("node-1", f"node-1 at {tick}")
    assert [block[0] for block in output.blocks] == [
        f"node-1 at {t}" for t in (0, 3, 6, 9, 12, 15, 18)
    ]


def test_on_a_terminal_a_new_line_shows_at_once_and_a_finished_one_is_printed() -> None:
    clock, output = Clock(0.0), Shown()
    with board_for(output, clock=clock) as board:
        board.update("node-1", "node-1: 0 of 2.1 GB")
        board.update("node-2", "node-2: 0 of 2.1 GB")
        assert output.blocks[-1] == ["node-1: 0 of 2.1 GB", "node-2: 0 of 2.1 GB"]
        board.finish("node-1", "node-1: 2.1 GB sent in 40 s (52 MB/s)")
        assert output.blocks[-1] == ["node-2: 0 of 2.1 GB"]
        assert output.said == ["node-1: 2.1 GB sent in 40 s (52 MB/s)"]
    assert output.blocks[-1] == []  # the block is cleared when the board closes
    assert output.said == ["node-1: 2.1 GB sent in 40 s (52 MB/s)"]


def test_a_milestone_is_shown_at_once_whatever_the_pace() -> None:
    clock, output = Clock(0.0), Shown()
    board = board_for(output, clock=clock)
    board.update("node-1", "node-1: 2.1 of 2.1 GB")
    clock.now = 0.1
    board.update("node-1", "node-1: 2.1 GB sent in 40 s; unpacking", 1.0, milestone=True)
    assert output.blocks[-1] == ["node-1: 2.1 GB sent in 40 s; unpacking"]


@pytest.mark.parametrize("live", [True, False])
def test_after_an_error_every_unfinished_line_is_printed_as_it_last_was(live: bool) -> None:
    output = Shown()
    board = ProgressBoard(output, output.show if live else None, clock=Clock())
    with pytest.raises(RuntimeError), board:
        board.update("build", "vcluster/node: 2 of 9 steps done")
        board.update("build", "vcluster/node: 3 of 9 steps done")
        raise RuntimeError("boom")
    assert output.said[-1] == "vcluster/node: 3 of 9 steps done"


def test_prefixed_output_stays_live_when_it_was() -> None:
    output = Shown()
    indented = prefixed(output, "    ")
    assert isinstance(indented, LiveOutput)
    indented("line")
    indented.show(["live"])
    assert output.said == ["    line"]
    assert output.blocks == [["    live"]]
    said: list[str] = []
    plain = prefixed(said.append, "    ")
    assert not isinstance(plain, LiveOutput)
    plain("line")
    assert said == ["    line"]


def test_nodes_updating_from_their_own_threads_never_draw_at_once() -> None:
    class Strict(Shown):
        def __init__(self) -> None:
            super().__init__()
            self.inside = threading.Lock()

        def show(self, lines: Sequence[str]) -> None:
            assert self.inside.acquire(blocking=False), "two threads drew at once"
            super().show(lines)
            self.inside.release()

    output = Strict()
    board = ProgressBoard(output, output.show, live_interval_s=0.0)

    def node(name: str) -> None:
        for count in range(2000):
            board.update(name, f"{name}: {count}")
        board.finish(name, f"{name}: done")

    threads = [threading.Thread(target=node, args=(f"node-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    board.close()
    assert sorted(output.said) == sorted(f"node-{i}: done" for i in range(8))
    assert output.blocks[-1] == []


# --- streams --------------------------------------------------------------------------------------


def test_a_transfer_off_a_terminal_prints_each_tenth_then_what_was_sent() -> None:
    clock, said = Clock(0.0), []
    board = ProgressBoard(said.append, clock=clock)
    transfer = Transfer(board, "node-1", 2_000_000_000, after_sent="unpacking", clock=clock)
    for second in range(1, 41):  # 50 MB a second
        clock.now = second
        transfer.add(50_000_000)
    transfer.add(0)  # the end of the stream
    clock.now = 47.0
    transfer.finish(ok=True)
    assert said == [
        "node-1: 50 MB of 2.0 GB, 50 MB/s, 39 s left",
        "node-1: 0.2 of 2.0 GB, 50 MB/s, 36 s left",
        "node-1: 0.4 of 2.0 GB, 50 MB/s, 32 s left",
        "node-1: 0.6 of 2.0 GB, 50 MB/s, 28 s left",
        "node-1: 0.8 of 2.0 GB, 50 MB/s, 24 s left",
        "node-1: 1.0 of 2.0 GB, 50 MB/s, 20 s left",
        "node-1: 1.2 of 2.0 GB, 50 MB/s, 16 s left",
        "node-1: 1.4 of 2.0 GB, 50 MB/s, 12 s left",
        "node-1: 1.6 of 2.0 GB, 50 MB/s, 8 s left",
        "node-1: 1.8 of 2.0 GB, 50 MB/s, 4 s left",
        "node-1: 2.0 of 2.0 GB, 50 MB/s",
        "node-1: 2.0 GB sent in 40 s (50 MB/s); unpacking",
        "node-1: 2.0 GB sent in 40 s (50 MB/s), done after 47 s",
    ]


def test_a_metered_stream_passes_every_byte_and_counts_them() -> None:
    said: list[str] = []
    clock = Clock(0.0)
    board = ProgressBoard(said.append, clock=clock)
    data = bytes(range(256)) * (10 << 12)  # 10 MiB
    with metered(board, "node-1", io.BytesIO(data), len(data), clock=clock) as stream:
        chunks = []
        while chunk := stream.read(1 << 20):
            chunks.append(chunk)
            clock.now += 0.5
    assert b"".join(chunks) == data
    assert said[0].startswith("node-1: 1.0 of 10 MB")
    assert said[-1] == "node-1: 10 MB sent in 5 s (2.1 MB/s)"


def test_a_stream_that_fails_says_where_it_stopped() -> None:
    said: list[str] = []
    clock = Clock(0.0)
    board = ProgressBoard(said.append, clock=clock)
    with pytest.raises(OSError), metered(board, "node-2", io.BytesIO(bytes(3000)), 2000, estimated=True, clock=clock) as stream:  # fmt: skip
        stream.read(1000)
        clock.now = 4.0
        raise OSError("connection lost")
    assert said[-1] == "node-2: stopped after 1.0 of about 2.0 kB (4 s)"


def test_without_a_board_the_stream_is_passed_as_it_is() -> None:
    stream = io.BytesIO(b"x")
    with metered(None, "node-1", stream, 1) as same:
        assert same is stream
