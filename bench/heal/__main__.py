"""Benchmark: how long the sandbox cluster takes to answer again after each fault, with no
vcluster command in between, next to how long vLLM alone takes to start on the same nodes.

    .venv/bin/python bench/heal [--keep] [--json]

The faults are those of tests/e2e/test_healing.py (tests/support/faults.py). "vLLM alone": vLLM
stopped on every node, then asked for again through the same supervisors, timed to its first
chat completion (no fault, no back-off, no Ray rejoin). Target per fault: heal <= 1.2 x that
+ 10 s. The sandbox is brought up first if needed (`vcluster sandbox up --name bench`), which
is not measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

# Run as a script from the repository root: make the package importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.decide.inventory import Inventory, load_inventory
from cluster.nodes.vllm import request_serve_argv, request_stop_argv
from cluster.sandbox.sandbox import sandbox_down, sandbox_up
from cluster.steps.base import SilentReporter
from cluster.steps.down import down
from cluster.steps.serve import spec_id
from cluster.steps.up import live_plan, up
from tests.support.faults import FAULTS, nodes_of, seconds_to_first_chat

TIMEOUT_S = 900.0
TARGET_FACTOR, TARGET_EXTRA_S = 1.2, 10.0


def vllm_alone(inventory: Inventory) -> float:
    """Stop vLLM on every node, ask for it again, and time its first chat completion."""
    plan = live_plan(inventory, SilentReporter())
    serving = [n for n in plan.nodes if n.serve is not None]
    with nodes_of(inventory) as nodes:
        for node in serving:
            nodes.in_container(node.name, request_stop_argv(node.container.supervisor.state_dir))
        while any(nodes.supervisor_report(n.name)["state"] != "stopped" for n in serving):
            time.sleep(0.5)
        started = time.monotonic()
        for node in serving:
            assert node.serve is not None
            state_dir = node.container.supervisor.state_dir
            argv = request_serve_argv(state_dir, node.serve, spec_id(node), "bench-heal")
            nodes.in_container(node.name, argv)
    seconds = seconds_to_first_chat(inventory, started, TIMEOUT_S)
    if seconds is None:
        raise SystemExit(f"vLLM did not answer within {TIMEOUT_S:.0f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the sandbox up")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)

    print("sandbox and cluster (not measured) ...", file=sys.stderr)
    sandbox = sandbox_up(2, Path(".work/bench"), "bench", progress=lambda _: None)
    inventory = load_inventory(sandbox.inventory)
    up(inventory, SilentReporter())

    print("vLLM alone, through the supervisors ...", file=sys.stderr)
    alone = vllm_alone(inventory)
    heals: dict[str, float | None] = {}
    for name, fault in FAULTS.items():
        print(f"fault: {name} ...", file=sys.stderr)
        with nodes_of(inventory) as nodes:
            started = time.monotonic()
            fault(nodes)
        heals[name] = seconds_to_first_chat(inventory, started, TIMEOUT_S)

    target = TARGET_FACTOR * alone + TARGET_EXTRA_S
    figures = {
        "vllm_alone_s": round(alone, 1),
        "target_s": round(target, 1),
        "heal_s": {k: (round(v, 1) if v is not None else None) for k, v in heals.items()},
        "ratio_to_vllm_alone": {
            k: (round(v / alone, 2) if v is not None else None) for k, v in heals.items()
        },
    }
    if not options.keep:
        down(inventory, SilentReporter())
        sandbox_down("bench", progress=lambda _: None)
    if options.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"\nvLLM alone (stopped, then asked for again): {alone:6.1f} s")
    print(f"target per fault: 1.2 x {alone:.1f} + 10 = {target:.1f} s")
    for name, seconds in heals.items():
        if seconds is None:
            print(f"  {name:<40} no answer within {TIMEOUT_S:.0f} s   MISSED")
            continue
        verdict = "met" if seconds <= target else "MISSED"
        print(f"  {name:<40} {seconds:6.1f} s  ({seconds / alone:4.2f} x alone)  {verdict}")


if __name__ == "__main__":
    main()
