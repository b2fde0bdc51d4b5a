"""Capture every listening socket of a running cluster's nodes, as docs/security.md is written
from and the listener fixtures are parsed from.

    python -m tests.support.capture_listeners INVENTORY OUTDIR [--name PREFIX]

Runs `cluster.decide.listeners.LISTENERS_SCRIPT` in each node's container (`vcluster exec`), writes
OUTDIR/PREFIX-NODE.txt, and prints what listens where and what protects it, as `check` names it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.decide.inventory import load_inventory
from cluster.decide.listeners import LISTENERS_SCRIPT, classify, parse_listeners
from tests.support.cli import vcluster


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("inventory", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--name", default="capture")
    args = parser.parse_args()
    inventory = load_inventory(args.inventory)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for node in inventory.head_first:
        name = node.node_name
        result = vcluster(
            "exec", str(args.inventory), "--node", name, "--", "python3", "-c", LISTENERS_SCRIPT
        )
        if result.returncode != 0:
            print(f"{name}: {result.stderr.strip()}", file=sys.stderr)
            return 1
        (args.outdir / f"{args.name}-{name}.txt").write_text(result.stdout)
        print(f"## {name}")
        for address, port, process in parse_listeners(result.stdout):
            entry = classify(address, port, process, inventory)
            print(f"{port:>6} {address:<16} {entry.component:<48} {entry.protection:<30} "
                  f"{entry.process}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
