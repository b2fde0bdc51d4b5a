"""Benchmark: one command on N SSH hosts, serially, with parallel OpenSSH and with vcluster.

Run as `.venv/bin/python bench/fanout` (root: the hosts are network namespaces, each with its
own sshd, from tests/support/ssh_lab.py). For 1, 8 and 32 hosts it times, for three methods,
opening the connections and then running over them a trivial command (`hostname`), `sleep 2`
on every host and `sleep 2` on one host only:

- serial OpenSSH: one ControlMaster per host, then `ssh HOST CMD` for one host after another;
- parallel OpenSSH: the same masters started and used through `xargs -P HOSTS`;
- vcluster fan-out: `connect` and `SshConnection.run` through `fan_out`.

Each measurement is repeated (the order of the methods reverses from run to run, to spread the
noise of a shared machine) and the median is reported, with the controller CPU per host. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# `python bench/fanout` puts only this folder on sys.path; the repository root gives `cluster`
# and the SSH lab in `tests/support`.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from methods import Method, cpu_count, methods_for
from report import Sample, as_json, summarize, table_text, verdict_line

from tests.support.ssh_lab import SshLab, cleanup_stale

LAB_PREFIX = "bench"
DEFAULT_HOSTS = (1, 8, 32)
DEFAULT_REPEAT = 3
TRIVIAL = ("hostname",)
SLOW = ("sleep", "2")


@dataclass(frozen=True)
class Workload:
    """A command for every host: `sleep 2` on the first `slow_hosts` (None: all), else hostname."""

    label: str
    slow_hosts: int | None

    def argv_by_host(self, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
        slow = len(names) if self.slow_hosts is None else self.slow_hosts
        return {name: SLOW if index < slow else TRIVIAL for index, name in enumerate(names)}

    def expected_lines(self, names: Sequence[str]) -> list[str]:
        """What the hosts print: the names of those that run `hostname`, in any order."""
        return sorted(name for name, argv in self.argv_by_host(names).items() if argv == TRIVIAL)


WORKLOADS = (
    Workload("hostname", slow_hosts=0),
    Workload("sleep 2", slow_hosts=None),
    Workload("1 host sleeps 2", slow_hosts=1),
)


def measure(
    hosts: int, phase: str, method: Method, action: Callable[[], object]
) -> tuple[Sample, object]:
    """Time `action` (wall clock) and the controller CPU `method` spent on it."""
    cpu_before = method.cpu_seconds()
    started = time.perf_counter()
    value = action()
    wall_s = time.perf_counter() - started
    sample = Sample(hosts, phase, method.label, wall_s, method.cpu_seconds() - cpu_before)
    return sample, value


def run_workload(method: Method, workload: Workload, names: Sequence[str]) -> Sample:
    """Time one workload on every host and check that each host printed what it should."""
    argv_by_host = workload.argv_by_host(names)
    sample, lines = measure(
        len(names), workload.label, method, functools.partial(method.run, argv_by_host)
    )
    if sorted(lines) != workload.expected_lines(names):
        raise RuntimeError(
            f"{method.label}, {workload.label}: hosts printed {sorted(lines)}, "
            f"expected {workload.expected_lines(names)}"
        )
    return sample


def one_round(
    methods: Sequence[Method], names: Sequence[str], workloads: Sequence[Workload]
) -> list[Sample]:
    """Every method connects, then runs each workload in turn, method after method; close all.

    Interleaving the methods phase by phase keeps the samples compared with each other close
    in time, which matters on a machine shared with other work.
    """
    samples = []
    try:
        for method in methods:
            sample, _ = measure(len(names), "connect", method, method.connect)
            samples.append(sample)
        for workload in workloads:
            for method in methods:
                samples.append(run_workload(method, workload, names))
    finally:
        for method in methods:
            method.close()
    return samples


def bench_host_count(hosts: int, repeat: int, workdir: Path) -> list[Sample]:
    """Start a lab of `hosts` hosts, warm every method up once, then time `repeat` rounds.

    The order of the methods reverses from round to round: parallel OpenSSH and vcluster, the
    pair whose ratio matters, always run next to each other, each first in turn.
    """
    progress(f"{hosts} host(s): starting the SSH lab")
    started = time.monotonic()
    with SshLab(workdir / f"lab-{hosts}", hosts, prefix=LAB_PREFIX) as lab:
        progress(f"{hosts} host(s): lab up in {time.monotonic() - started:.2f} s; warming up")
        names = [host.name for host in lab.hosts]
        one_round(methods_for(lab, lab.hosts), names, WORKLOADS[:1])
        samples = []
        for round_index in range(repeat):
            methods = methods_for(lab, lab.hosts)
            if round_index % 2:
                methods.reverse()
            progress(f"{hosts} host(s): run {round_index + 1}/{repeat}")
            samples += one_round(methods, names, WORKLOADS)
    return samples


def progress(message: str) -> None:
    print(f"[bench/fanout] {message}", file=sys.stderr, flush=True)


def host_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"host counts must be positive integers, got {text!r}")
    return counts


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/fanout",
        description="One command on N SSH hosts: serial and parallel OpenSSH against vcluster.",
    )
    parser.add_argument(
        "--hosts",
        type=host_counts,
        default=list(DEFAULT_HOSTS),
        help="comma-separated host counts (default: 1,8,32)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help=f"timed runs per measurement; the median is reported (default: {DEFAULT_REPEAT})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print every sample, median and ratio as JSON"
    )
    arguments = parser.parse_args(argv)
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    return arguments


def main(argv: Sequence[str]) -> int:
    arguments = parse_arguments(argv)
    if os.geteuid() != 0:
        progress("needs root: every host is a network namespace with its own sshd")
        return 2
    removed = cleanup_stale(LAB_PREFIX)
    if removed:
        progress(f"removed stale labs of a crashed run: {', '.join(removed)}")
    load_before = os.getloadavg()
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="vcluster-bench-") as workdir:
        for hosts in arguments.hosts:
            samples += bench_host_count(hosts, arguments.repeat, Path(workdir))
    machine = {
        "cpus": cpu_count(),
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
    }
    if arguments.json:
        print(json.dumps(as_json(samples, machine), indent=2))
        return 0
    summaries = summarize(samples)
    print(
        f"{machine['cpus']} CPUs shared by the controller and every host's sshd; load average "
        f"{machine['load_average_before'][0]} before, {machine['load_average_after'][0]} after"
    )
    for hosts in arguments.hosts:
        print()
        print(table_text(summaries, hosts))
    print()
    for hosts in arguments.hosts:
        print(verdict_line(summaries, hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
