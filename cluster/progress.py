"""Progress a person can trust: a meter of bytes or items, its wording, and when to show it.

Time comes in as an argument or an injected clock, output goes to callbacks, so all of it runs in
tests without sleeping. A `ProgressBoard` keeps one status line per thing in progress (a node an
image streams to, a build) and paces them for where they go:

- a terminal (a `LiveOutput`): the lines as a block redrawn in place, at most 4 times a second;
- anything else, e.g. a CI log: plain lines, for each thing its first, then one every 10 s or
  each time it passes another tenth of its total, and its outcome.

Figures are only those that can be known: a rate once a second of samples is there, time left only
with a total and a rate above zero, "about" before a total that is an estimate.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import BinaryIO, Protocol, runtime_checkable

RATE_WINDOW_S = 10.0
"""The rate is the amount done over the last 10 s: recent enough to follow a slowing link, long
enough not to jump with every chunk."""
MIN_RATE_SPAN_S = 1.0
"""Below a second of samples there is no rate yet (the first chunks arrive in bursts)."""
SAMPLE_SPACING_S = 0.2
LIVE_INTERVAL_S = 0.25
PLAIN_INTERVAL_S = 10.0
PLAIN_STEP = 0.1

Progress = Callable[[str], None]
"""Where progress lines go: one call per line."""


# --- wording --------------------------------------------------------------------------------------

_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0))


def _unit(count: float) -> tuple[str, float]:
    return next((name, size) for name, size in _UNITS if count >= size or size == 1.0)


def _number(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def format_bytes(count: float) -> str:
    """Decimal units, as Docker and pip print sizes: `512 B`, `9.4 kB`, `45 MB`, `2.1 GB`."""
    name, size = _unit(count)
    return f"{count:.0f} B" if size == 1.0 else f"{_number(count / size)} {name}"


def format_rate(bytes_per_s: float) -> str:
    """`45 MB/s`."""
    return f"{format_bytes(bytes_per_s)}/s"


def format_duration(seconds: float) -> str:
    """`8 s`, `2 min 5 s`, `1 h 2 min`."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(whole, 3600)
    return f"{hours} h {rest // 60} min"


def bytes_of(done: float, total: float | None, *, estimated: bool = False) -> str:
    """`1.2 of 2.1 GB`, `45 MB of 2.1 GB`, `1.2 of about 2.1 GB`, or `1.2 GB` without a total.

    An estimated total that `done` went past is dropped rather than shown wrong.
    """
    if total is None or (estimated and done > total):
        return format_bytes(done)
    about = "about " if estimated else ""
    name, size = _unit(total)
    if done >= size / 10:  # "0.1 of 2.1 GB" reads well, "0.0 of 2.1 GB" does not
        return f"{_number(done / size)} of {about}{_number(total / size)} {name}"
    return f"{format_bytes(done)} of {about}{format_bytes(total)}"


# --- the meter ------------------------------------------------------------------------------------


class Meter:
    """An amount done (bytes or items) of an optional total, sampled over time.

    `rate(now)` is the amount done in the last `window_s` seconds divided by the time they span up
    to `now`, so a stalled transfer's rate falls to zero; it is None while the samples span less
    than `MIN_RATE_SPAN_S`. `seconds_left(now)` is the rest at that rate, None without a total,
    without a rate above zero, or past the total.
    """

    def __init__(
        self, started: float, total: float | None = None, window_s: float = RATE_WINDOW_S
    ) -> None:
        self.started = started
        self.total = total
        self.window_s = window_s
        self.done = 0.0
        self._samples: deque[tuple[float, float]] = deque([(started, 0.0)])

    def add(self, now: float, amount: float) -> None:
        """`amount` more is done at `now`."""
        self.set(now, self.done + amount)

    def set(self, now: float, done: float) -> None:
        """`done` in all at `now`."""
        self.done = done
        samples = self._samples
        # Samples at least SAMPLE_SPACING_S apart, the newest exact: a few dozen per window.
        if len(samples) >= 2 and now - samples[-2][0] < SAMPLE_SPACING_S:
            samples[-1] = (now, done)
        else:
            samples.append((now, done))
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()

    def rate(self, now: float) -> float | None:
        """Amount per second over the last `window_s` seconds, or None when too early to say."""
        anchor = self._samples[0]
        for sample in self._samples:
            if sample[0] > now - self.window_s:
                break
            anchor = sample
        span = now - anchor[0]
        if span < MIN_RATE_SPAN_S:
            return None
        return max(0.0, self.done - anchor[1]) / span

    def seconds_left(self, now: float) -> float | None:
        """The time the rest takes at the current rate, when that can be known."""
        if self.total is None or self.done > self.total:
            return None
        rate = self.rate(now)
        if not rate:
            return None
        return (self.total - self.done) / rate

    def fraction(self) -> float | None:
        """Done over total (at most 1), or None without a total."""
        if not self.total:
            return None
        return min(1.0, self.done / self.total)

    def average_rate(self, now: float) -> float | None:
        """Amount per second since the start."""
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0 else None


def describe_transfer(meter: Meter, now: float, *, estimated: bool = False) -> str:
    """`1.2 of 2.1 GB, 45 MB/s, 20 s left` (rate over the meter's window)."""
    parts = [bytes_of(meter.done, meter.total, estimated=estimated)]
    rate = meter.rate(now)
    if rate is not None:
        parts.append(format_rate(rate))
    left = meter.seconds_left(now)
    if left:  # rounded up: a countdown that says 0 s while bytes remain would not be trusted
        parts.append(f"{'about ' if estimated else ''}{format_duration(math.ceil(left))} left")
    return ", ".join(parts)


# --- pacing ---------------------------------------------------------------------------------------


class PlainCadence:
    """When one thing's plain line is due: its first update, then every `interval_s`, or each
    time its fraction passes another multiple of `step`."""

    def __init__(self, interval_s: float = PLAIN_INTERVAL_S, step: float = PLAIN_STEP) -> None:
        self.interval_s = interval_s
        self.step = step
        self._last_at: float | None = None
        self._last_step = 0

    def due(self, now: float, fraction: float | None = None) -> bool:
        """Whether to print now; a True counts as printed."""
        steps = self._last_step if fraction is None else math.floor(fraction / self.step + 1e-9)
        recent = self._last_at is not None and now - self._last_at < self.interval_s
        if recent and steps <= self._last_step:
            return False
        self._last_at = now
        self._last_step = max(steps, self._last_step)
        return True


@runtime_checkable
class LiveOutput(Protocol):
    """A progress callback that can also keep a block of lines redrawn in place (a terminal)."""

    def __call__(self, line: str) -> None: ...

    def show(self, lines: Sequence[str]) -> None: ...


class ProgressBoard:
    """Status lines of things in progress, one per key, paced for where they go. Thread-safe.

    `say` prints a line for good. `show`, given only for a terminal, replaces the block of live
    lines; without it, updates become plain lines (see `PlainCadence`). Used as a context
    manager: on an error, every unfinished line is printed as it last was, to show where it
    stopped; the live block is cleared in any case.
    """

    def __init__(
        self,
        say: Progress,
        show: Callable[[Sequence[str]], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        live_interval_s: float = LIVE_INTERVAL_S,
        plain_interval_s: float = PLAIN_INTERVAL_S,
        plain_step: float = PLAIN_STEP,
    ) -> None:
        self._say = say
        self._show = show
        self._clock = clock
        self._live_interval_s = live_interval_s
        self._plain_interval_s = plain_interval_s
        self._plain_step = plain_step
        self._lines: dict[str, str] = {}
        self._cadences: dict[str, PlainCadence] = {}
        self._drawn_at: float | None = None
        self._shown = False
        self._lock = threading.Lock()

    @property
    def live(self) -> bool:
        return self._show is not None

    def update(
        self, key: str, text: str, fraction: float | None = None, *, milestone: bool = False
    ) -> None:
        """The latest status of `key`; `fraction` (done over total) paces plain lines only.

        A `milestone` (a phase that begins) is shown whatever the pace.
        """
        with self._lock:
            now = self._clock()
            new = key not in self._lines
            self._lines[key] = text
            if self._show is None:
                cadence = self._cadences.setdefault(
                    key, PlainCadence(self._plain_interval_s, self._plain_step)
                )
                if cadence.due(now, fraction) or milestone:
                    self._say(text)
            else:
                waited = self._drawn_at is None or now - self._drawn_at >= self._live_interval_s
                if waited or new or milestone:
                    self._draw(now)

    def finish(self, key: str, text: str) -> None:
        """`key` is done: its line leaves the live block and `text` is printed for good."""
        with self._lock:
            self._cadences.pop(key, None)
            if self._lines.pop(key, None) is not None and self._show is not None:
                self._draw(self._clock())
            self._say(text)

    def close(self, *, failed: bool = False) -> None:
        """Clear the live block; with `failed`, print every unfinished line as it last was."""
        with self._lock:
            left = list(self._lines.values())
            self._lines.clear()
            self._cadences.clear()
            if self._shown and self._show is not None:
                self._draw(self._clock())
            if failed:
                for text in left:
                    self._say(text)

    def _draw(self, now: float) -> None:
        assert self._show is not None
        self._show(list(self._lines.values()))
        self._shown = bool(self._lines)
        self._drawn_at = now

    def __enter__(self) -> ProgressBoard:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=kind is not None)


def board_for(output: Progress, clock: Callable[[], float] = time.monotonic) -> ProgressBoard:
    """A board over a progress callback: live when it can redraw lines, plain lines otherwise."""
    if isinstance(output, LiveOutput):
        return ProgressBoard(output, output.show, clock=clock)
    return ProgressBoard(output, clock=clock)


class _PrefixedLive:
    def __init__(self, output: LiveOutput, prefix: str) -> None:
        self._output = output
        self._prefix = prefix

    def __call__(self, line: str) -> None:
        self._output(self._prefix + line)

    def show(self, lines: Sequence[str]) -> None:
        self._output.show([self._prefix + line for line in lines])


def prefixed(output: Progress, prefix: str) -> Progress:
    """`output` with `prefix` before every line; live when `output` is."""
    if isinstance(output, LiveOutput):
        return _PrefixedLive(output, prefix)
    return lambda line: output(prefix + line)


# --- streams --------------------------------------------------------------------------------------


class ByteSource(Protocol):
    """A binary stream to read from: a file, a pipe, a paramiko channel's file."""

    def read(self, size: int, /) -> bytes: ...


class _CountingRaw(io.RawIOBase):
    """Reads from `stream`, telling `on_read` how many bytes each read brought."""

    def __init__(self, stream: ByteSource, on_read: Callable[[int], None]) -> None:
        self._stream = stream
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        readinto = getattr(self._stream, "readinto", None)
        if readinto is not None:  # files, pipes and paramiko channels: no extra copy
            count = readinto(buffer) or 0
        else:
            data = self._stream.read(len(buffer))
            count = len(data)
            buffer[:count] = data
        self._on_read(count)
        return count


class Transfer:
    """One stream's bytes against its total, as `KEY: 1.2 of 2.1 GB, 45 MB/s, 20 s left`.

    `estimated`: the total is an estimate (shown with "about"). `after_sent` says what happens
    once every byte is sent (the receiver may work on for a while).
    """

    def __init__(
        self,
        board: ProgressBoard,
        key: str,
        total: int | None,
        *,
        estimated: bool = False,
        after_sent: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._board = board
        self._key = key
        self._estimated = estimated
        self._after_sent = after_sent
        self._clock = clock
        self._meter = Meter(clock(), total)
        self._sent_at: float | None = None

    def add(self, count: int) -> None:
        """`count` more bytes went through; 0 means the stream ended."""
        now = self._clock()
        if count:
            self._meter.add(now, count)
            text = describe_transfer(self._meter, now, estimated=self._estimated)
            self._board.update(self._key, f"{self._key}: {text}", self._meter.fraction())
        elif self._sent_at is None:
            self._sent_at = now
            then = f"; {self._after_sent}" if self._after_sent else ""
            text = f"{self._key}: {self._sent(now)}{then}"
            self._board.update(self._key, text, 1.0, milestone=bool(self._after_sent))

    def reader(self, stream: ByteSource) -> BinaryIO:
        """`stream`, counted as it is read."""
        # A buffer of 1 byte: no read-ahead, so the bytes counted are the bytes handed on.
        return io.BufferedReader(_CountingRaw(stream, self.add), buffer_size=1)

    def finish(self, ok: bool) -> None:
        """Print the outcome: what was sent and in how long, or where it stopped."""
        now = self._clock()
        took = format_duration(now - self._meter.started)
        if not ok:
            done = bytes_of(self._meter.done, self._meter.total, estimated=self._estimated)
            self._board.finish(self._key, f"{self._key}: stopped after {done} ({took})")
            return
        sent_at = now if self._sent_at is None else self._sent_at
        then = f", done after {took}" if now - sent_at >= 1.0 else ""
        self._board.finish(self._key, f"{self._key}: {self._sent(sent_at)}{then}")

    def _sent(self, at: float) -> str:
        elapsed = at - self._meter.started
        rate = f" ({format_rate(self._meter.done / elapsed)})" if elapsed > 0 else ""
        return f"{format_bytes(self._meter.done)} sent in {format_duration(elapsed)}{rate}"


@contextlib.contextmanager
def metered(
    board: ProgressBoard | None,
    key: str,
    stream: ByteSource,
    total: int | None,
    *,
    estimated: bool = False,
    after_sent: str = "",
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[ByteSource]:
    """`stream`, its bytes shown on `board` under `key` while the block runs (as is without a
    board); the outcome is printed when the block ends."""
    if board is None:
        yield stream
        return
    transfer = Transfer(board, key, total, estimated=estimated, after_sent=after_sent, clock=clock)
    try:
        yield transfer.reader(stream)
    except BaseException:
        transfer.finish(ok=False)
        raise
    transfer.finish(ok=True)
