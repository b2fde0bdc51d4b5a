"""Turn the benchmark's samples into medians, ratios, a table and JSON (pure functions)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

SERIAL = "serial OpenSSH"
PARALLEL = "parallel OpenSSH"
VCLUSTER = "vcluster fan-out"
METHODS = (SERIAL, PARALLEL, VCLUSTER)
TARGET_HOSTS = 32
TARGET_RATIO = 1.0
"""vcluster / parallel OpenSSH must be at most this at TARGET_HOSTS hosts."""


@dataclass(frozen=True)
class Sample:
    """One timed phase of one method: wall time and the controller CPU it used."""

    hosts: int
    phase: str
    method: str
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class Summary:
    """The median of the samples of one (hosts, phase, method)."""

    hosts: int
    phase: str
    method: str
    wall_s: float
    cpu_ms_per_host: float
    runs: int


def summarize(samples: Sequence[Sample]) -> list[Summary]:
    """Medians per (hosts, phase, method), in the order the samples first appear."""
    groups: dict[tuple[int, str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.hosts, sample.phase, sample.method), []).append(sample)
    return [
        Summary(
            hosts=hosts,
            phase=phase,
            method=method,
            wall_s=statistics.median(s.wall_s for s in group),
            cpu_ms_per_host=statistics.median(s.cpu_s for s in group) * 1000 / hosts,
            runs=len(group),
        )
        for (hosts, phase, method), group in groups.items()
    ]


def _lookup(summaries: Sequence[Summary]) -> dict[tuple[int, str, str], Summary]:
    return {(s.hosts, s.phase, s.method): s for s in summaries}


def _phases(summaries: Sequence[Summary], hosts: int) -> list[str]:
    return list(dict.fromkeys(s.phase for s in summaries if s.hosts == hosts))


def ratio(summaries: Sequence[Summary], hosts: int, phase: str, over: str, under: str) -> float:
    """Median wall time of `over` divided by that of `under`."""
    table = _lookup(summaries)
    return table[hosts, phase, over].wall_s / table[hosts, phase, under].wall_s


def table_text(summaries: Sequence[Summary], hosts: int) -> str:
    """The table of one host count: each method's time and CPU per phase, and the ratios."""
    table = _lookup(summaries)
    runs = max(s.runs for s in summaries if s.hosts == hosts)
    header = f"{'phase':<18}" + "".join(f"{m:>22}" for m in METHODS)
    header += f"{'vcluster/OpenSSH':>18}{'serial/vcluster':>17}"
    lines = [
        f"{hosts} host(s), median of {runs} run(s): wall s (controller CPU ms per host)",
        header,
    ]
    for phase in _phases(summaries, hosts):
        cells = "".join(
            f"{f'{table[hosts, phase, m].wall_s:.2f} ({table[hosts, phase, m].cpu_ms_per_host:.1f})':>22}"
            for m in METHODS
        )
        over_openssh = ratio(summaries, hosts, phase, VCLUSTER, PARALLEL)
        serial_over = ratio(summaries, hosts, phase, SERIAL, VCLUSTER)
        lines.append(f"{phase:<18}{cells}{over_openssh:>18.2f}{serial_over:>17.2f}")
    return "\n".join(lines)


def verdict_line(summaries: Sequence[Summary], hosts: int) -> str:
    """One line: vcluster / parallel OpenSSH per phase, and the target where it applies."""
    ratios = {
        phase: ratio(summaries, hosts, phase, VCLUSTER, PARALLEL)
        for phase in _phases(summaries, hosts)
    }
    text = ", ".join(f"{phase} {value:.2f}" for phase, value in ratios.items())
    line = f"{hosts:>3} host(s): vcluster / parallel OpenSSH = {text}"
    if hosts == TARGET_HOSTS:
        worst = max(ratios.values())
        met = "met" if worst <= TARGET_RATIO else "NOT met"
        line += f"  (target <= {TARGET_RATIO:.1f}: {met}, worst {worst:.2f})"
    return line


def as_json(samples: Sequence[Sample], machine: dict[str, object]) -> dict[str, object]:
    """Every sample, the medians and the ratios, for tools."""
    summaries = summarize(samples)
    host_counts = list(dict.fromkeys(s.hosts for s in summaries))
    return {
        "machine": machine,
        "samples": [sample.__dict__ for sample in samples],
        "medians": [summary.__dict__ for summary in summaries],
        "ratios": [
            {
                "hosts": hosts,
                "phase": phase,
                "vcluster_over_parallel_openssh": ratio(
                    summaries, hosts, phase, VCLUSTER, PARALLEL
                ),
                "serial_over_vcluster": ratio(summaries, hosts, phase, SERIAL, VCLUSTER),
            }
            for hosts in host_counts
            for phase in _phases(summaries, hosts)
        ],
    }
