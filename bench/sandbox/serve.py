"""`bench/sandbox --serve`: an N-node sandbox serving the tiny model with PP N, one chat
completion answered; time to serve and memory per node (not a test, not in CI).

Run it under the e2e lock (it starts vLLM on every node):

    flock /tmp/vcluster-e2e.lock .venv/bin/python bench/sandbox --nodes 4 --serve

Figures: `sandbox up` (warm images), `vcluster up` (Ray + vLLM with PP N), the first chat
completion, then each node container's memory (cgroup `memory.current` and `memory.peak`, which
hold the node's inner dockerd, its Ray and vLLM processes) and the machine's available memory.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cluster.decide.inventory import load_inventory
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.inventory_file import SERVED_NAME
from cluster.sandbox.keys import api_key_file
from cluster.sandbox.sandbox import sandbox_down, sandbox_up
from cluster.steps.base import SilentReporter
from cluster.steps.down import down
from cluster.steps.up import up

NAME = "bench-pp"
GiB = 1024**3


@dataclass(frozen=True)
class NodeMemory:
    node: str
    current: int
    peak: int | None


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def node_memory(host: str, container: str, node: str) -> NodeMemory:
    """The node container's cgroup memory (its own cgroup root, seen from inside)."""
    argv = ["docker", "--host", host, "exec", container, "sh", "-c",
            "cat /sys/fs/cgroup/memory.current; cat /sys/fs/cgroup/memory.peak 2>/dev/null || true"]  # fmt: skip
    lines = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    return NodeMemory(node, int(lines[0]), int(lines[1]) if len(lines) > 1 else None)


def chat(endpoint: str, key: str) -> tuple[float, str]:
    """Seconds for one chat completion, and its text."""
    body = json.dumps({"model": SERVED_NAME, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{endpoint}/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=300) as reply:
        data = json.loads(reply.read())
    return time.monotonic() - started, data["choices"][0]["message"]["content"]


def serve_bench(nodes: int, workdir: Path, keep: bool) -> int:
    local = ensure_local_docker()
    before = _mem_available()
    started = time.monotonic()
    sandbox = sandbox_up(nodes, workdir, NAME, progress=lambda _: None)
    sandbox_s = time.monotonic() - started
    inventory = load_inventory(sandbox.inventory)
    try:
        started = time.monotonic()
        up(inventory, SilentReporter())
        up_s = time.monotonic() - started
        endpoint = f"http://{inventory.head.address}:{inventory.ports.vllm}/v1"
        key = api_key_file(sandbox.workdir).read_text().strip()
        first_s, text = chat(endpoint, key)
        second_s, _ = chat(endpoint, key)
        memory = [node_memory(local.host, n.container, n.name) for n in sandbox.nodes]
        after = _mem_available()
    finally:
        if not keep:
            down(inventory, SilentReporter())
            sandbox_down(NAME, progress=lambda _: None)
    print(f"\n{nodes}-node sandbox, PP {nodes}, tiny model on CPU")
    print(f"  sandbox up (images warm)          {sandbox_s:7.1f} s")
    print(f"  vcluster up (Ray + vLLM, PP {nodes})    {up_s:7.1f} s")
    print(f"  first chat completion             {first_s:7.2f} s   ({text[:40]!r})")
    print(f"  second chat completion            {second_s:7.2f} s")
    print(f"  time to serve (sandbox up + up + first answer) {sandbox_s + up_s + first_s:7.1f} s")
    print("  memory per node container (cgroup):")
    for m in memory:
        peak = f"{m.peak / GiB:5.2f} GiB" if m.peak is not None else "n/a"
        print(f"    {m.node:<8} current {m.current / GiB:5.2f} GiB   peak {peak}")
    total = sum(m.current for m in memory)
    print(f"    all      current {total / GiB:5.2f} GiB")
    print(f"  machine MemAvailable: {before / GiB:5.1f} GiB before, {after / GiB:5.1f} GiB serving")
    return 0
