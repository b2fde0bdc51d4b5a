"""Benchmark: a warm `vcluster sandbox up` (images built, after a `down`), nodes in memory and
on disk (not a test).

    .venv/bin/python bench/sandbox [--nodes 2] [--runs 3] [--storage memory disk]

For each storage mode: `runs` cycles of `sandbox up` then `sandbox down`, timed, on a sandbox
named `bench-sb` of its own. A first `up` before the cycles builds what is missing and saves the
image archive (not part of the figures). Prints every run, the medians, and the ratios
median warm `up` / 60 s (target < 1 for 2 nodes) and disk / memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from the repository root: make the package importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.sandbox.sandbox import sandbox_down, sandbox_up

NAME = "bench-sb"
TARGET_S = 60.0


def _quiet(_: str) -> None:
    pass


def timed_cycles(nodes: int, storage: str, runs: int, workdir: Path) -> list[tuple[float, float]]:
    """(up seconds, down seconds) of each warm cycle."""
    sandbox_up(nodes, workdir, NAME, progress=_quiet, node_storage=storage)  # warm-up, untimed
    sandbox_down(NAME, progress=_quiet)
    cycles = []
    for run in range(1, runs + 1):
        started = time.monotonic()
        sandbox_up(nodes, workdir, NAME, progress=_quiet, node_storage=storage)
        up_s = time.monotonic() - started
        started = time.monotonic()
        sandbox_down(NAME, progress=_quiet)
        down_s = time.monotonic() - started
        print(f"{storage:>6} run {run}: up {up_s:5.1f} s   down {down_s:5.1f} s", flush=True)
        cycles.append((up_s, down_s))
    return cycles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--storage", nargs="+", default=["memory", "disk"],
                        choices=["memory", "disk"])  # fmt: skip
    args = parser.parse_args()
    medians: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vcluster-bench-sb-") as workdir:
        try:
            for storage in args.storage:
                cycles = timed_cycles(args.nodes, storage, args.runs, Path(workdir))
                medians[storage] = (
                    statistics.median(up for up, _ in cycles),
                    statistics.median(down for _, down in cycles),
                )
        finally:
            sandbox_down(NAME, progress=_quiet)
    print(f"\nwarm sandbox up, {args.nodes} node(s), median of {args.runs}:")
    for storage, (up_s, down_s) in medians.items():
        print(f"  {storage:>6}: up {up_s:5.1f} s (up / {TARGET_S:.0f} s = {up_s / TARGET_S:.2f})"
              f"   down {down_s:5.1f} s")  # fmt: skip
    if {"memory", "disk"} <= medians.keys():
        ratio = medians["disk"][0] / medians["memory"][0]
        print(f"  disk / memory (up): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
