"""Benchmark: a warm `vcluster sandbox up` (images built, after a `down`), nodes in memory and
on disk (not a test).

    .venv/bin/python bench/sandbox [--nodes 2] [--runs 3] [--storage memory disk]
    .venv/bin/python bench/sandbox --nodes 4 --serve [--keep]   (under the e2e lock)

`runs` cycles of `sandbox up` then `sandbox down` per storage mode, timed, the modes taking
turns, on a sandbox named `bench-sb` of its own. A first cycle builds what is missing and saves
the image archive (not part of the figures). Prints every run, the medians, and the ratios
median warm `up` / 60 s (target < 1 for 2 nodes) and disk / memory. `--serve` instead serves
the tiny model with PP N across the nodes and prints time to serve and memory per node
(`bench/sandbox/serve.py`).
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

from serve import serve_bench  # this folder is on sys.path (python bench/sandbox)

from cluster.sandbox.sandbox import sandbox_down, sandbox_up
from cluster.sandbox.storage import DISK, MEMORY

NAME = "bench-sb"
TARGET_S = 60.0


def _quiet(_: str) -> None:
    pass


def timed_cycle(nodes: int, storage: str, workdir: Path) -> tuple[float, float]:
    """(up seconds, down seconds) of one warm `up`/`down` cycle."""
    started = time.monotonic()
    sandbox_up(nodes, workdir, NAME, progress=_quiet, node_storage=storage)
    up_s = time.monotonic() - started
    started = time.monotonic()
    sandbox_down(NAME, progress=_quiet)
    return up_s, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--storage", nargs="+", default=[MEMORY, DISK], choices=[MEMORY, DISK])
    parser.add_argument("--serve", action="store_true", help="serve with PP N, a chat answered")
    parser.add_argument("--keep", action="store_true", help="with --serve: leave it serving")
    args = parser.parse_args()
    if args.serve:
        return serve_bench(args.nodes, Path(".work/bench-pp"), args.keep)
    cycles: dict[str, list[tuple[float, float]]] = {storage: [] for storage in args.storage}
    with tempfile.TemporaryDirectory(prefix="vcluster-bench-sb-") as workdir:
        try:
            timed_cycle(args.nodes, args.storage[0], Path(workdir))  # builds, saves: untimed
            for run in range(1, args.runs + 1):
                for storage in args.storage:  # interleaved: drift hits every mode alike
                    up_s, down_s = timed_cycle(args.nodes, storage, Path(workdir))
                    print(f"{storage:>6} run {run}: up {up_s:5.1f} s   down {down_s:5.1f} s",
                          flush=True)  # fmt: skip
                    cycles[storage].append((up_s, down_s))
        finally:
            sandbox_down(NAME, progress=_quiet)
    medians = {
        storage: (statistics.median(u for u, _ in runs), statistics.median(d for _, d in runs))
        for storage, runs in cycles.items()
    }
    print(f"\nwarm sandbox up, {args.nodes} node(s), median of {args.runs}:")
    for storage, (up_s, down_s) in medians.items():
        print(f"  {storage:>6}: up {up_s:5.1f} s (up / {TARGET_S:.0f} s = {up_s / TARGET_S:.2f})"
              f"   down {down_s:5.1f} s")  # fmt: skip
    if {MEMORY, DISK} <= medians.keys():
        ratio = medians[DISK][0] / medians[MEMORY][0]
        print(f"  disk / memory (up): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
