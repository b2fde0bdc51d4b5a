"""Benchmark: `vcluster up` on the warm sandbox, split into controller overhead, Ray formation
and vLLM start-up, next to vLLM's own start-up on the head alone (not a test).

    .venv/bin/python bench/up [--nodes 2] [--keep]

Prints the figures and two ratios: up / (Ray formation + vLLM start-up) (target <= 1.2: the
controller adds almost nothing) and the time of `up` on an already healthy cluster (target < 5 s).
The sandbox is built first if needed (`vcluster sandbox up --name bench`); its image build and
streaming are not part of the figures.
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

from cluster.decide.inventory import load_inventory
from cluster.decide.plan import container_name
from cluster.nodes.session import Session
from cluster.nodes.vllm import http_get
from cluster.sandbox.sandbox import sandbox_down, sandbox_up
from cluster.steps.down import down
from cluster.steps.up import up

RAY_STEPS = {"Waiting for the Ray head", "Waiting for every node in Ray"}
VLLM_STEPS = {"Waiting for vLLM to serve"}
SOLO_CONTAINER = "vcluster-bench-solo"


class StepTimes:
    """A reporter that records each step's duration."""

    live = False

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    def start(self, title: str) -> None:
        print(f"  {title} ...", file=sys.stderr, flush=True)

    def progress(self, text: str) -> None:
        pass

    def finish(self, title: str, ok: bool, detail: str, duration_s: float) -> None:
        self.durations[title] = self.durations.get(title, 0.0) + duration_s

    def note(self, text: str) -> None:
        pass


def vllm_alone(inventory_path: Path) -> float:
    """Seconds from `docker run` of `vllm serve` (one node, no pipeline) to /v1/models on the head."""
    inventory = load_inventory(inventory_path)
    head = inventory.head
    served = inventory.model.served_name or inventory.model.name
    argv = [
        "docker", "run", "--detach", "--rm", "--name", SOLO_CONTAINER,
        "--network", "host", "--ipc", "host",
        "--volume", f"{inventory.model_cache}:/root/.cache/huggingface",
        *[x for k, v in inventory.env.items() for x in ("--env", f"{k}={v}")],
        "--entrypoint", "vllm", inventory.image,
        "serve", inventory.container_model_path(), "--served-model-name", served,
        "--port", str(inventory.ports.vllm), *inventory.model.args,
    ]  # fmt: skip
    with Session(inventory) as session:
        session.open([head])
        ssh = session.ssh(head.node_name)
        started = time.monotonic()
        ssh.run(argv, check=True)
        try:
            while True:
                try:
                    if (
                        http_get(ssh, head.address, inventory.ports.vllm, "/v1/models").status
                        == 200
                    ):
                        return time.monotonic() - started
                except OSError:
                    pass
                if time.monotonic() - started > 600:
                    raise SystemExit("vLLM alone did not start within 600 s")
                time.sleep(0.5)
        finally:
            ssh.run(["docker", "rm", "--force", SOLO_CONTAINER])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="leave the sandbox up")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # refused polls are expected

    print("sandbox (not measured) ...", file=sys.stderr)
    sandbox = sandbox_up(options.nodes, Path(".work/bench"), "bench", progress=lambda _: None)
    inventory = load_inventory(sandbox.inventory)
    down(inventory, StepTimes())  # start from no cluster

    print("vLLM alone on the head ...", file=sys.stderr)
    alone = vllm_alone(sandbox.inventory)

    print("vcluster up (cold: no containers) ...", file=sys.stderr)
    steps = StepTimes()
    started = time.monotonic()
    up(inventory, steps)
    total = time.monotonic() - started
    ray = sum(v for k, v in steps.durations.items() if k in RAY_STEPS)
    vllm = sum(v for k, v in steps.durations.items() if k in VLLM_STEPS)
    controller = total - ray - vllm

    print("vcluster up (healthy cluster) ...", file=sys.stderr)
    started = time.monotonic()
    result = up(inventory, StepTimes())
    healthy = time.monotonic() - started
    assert not result.changes, result.changes

    figures = {
        "nodes": options.nodes,
        "up_total_s": round(total, 1),
        "controller_overhead_s": round(controller, 1),
        "ray_formation_s": round(ray, 1),
        "vllm_startup_in_up_s": round(vllm, 1),
        "vllm_alone_on_head_s": round(alone, 1),
        "ratio_up_over_ray_plus_vllm": round(total / (ray + vllm), 3),
        "up_on_healthy_cluster_s": round(healthy, 2),
        "steps_s": {k: round(v, 2) for k, v in steps.durations.items()},
    }
    if not options.keep:
        down(inventory, StepTimes())
        sandbox_down("bench", progress=lambda _: None)
    if options.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"\nvcluster up on the {options.nodes}-node sandbox ({container_name('bench')})")
    for title, seconds in figures["steps_s"].items():
        print(f"  {title:<34} {seconds:7.2f} s")
    print(f"  {'total':<34} {total:7.2f} s")
    print(f"controller overhead            {controller:7.1f} s")
    print(f"Ray formation                  {ray:7.1f} s")
    print(f"vLLM start-up (PP across nodes){vllm:7.1f} s")
    print(f"vLLM alone on the head (PP 1)  {alone:7.1f} s")
    print(
        f"up / (Ray + vLLM)              {figures['ratio_up_over_ray_plus_vllm']:7.3f}  (target <= 1.2)"
    )
    print(f"up on a healthy cluster        {healthy:7.2f} s  (target < 5 s)")


if __name__ == "__main__":
    main()
