"""`bench/sandbox --serve`: an N-node sandbox serving the tiny model with PP N, one chat
completion answered; time to serve and memory per node (not a test, not in CI).

Run it under the e2e lock (it starts vLLM on every node):

    flock /tmp/vcluster-e2e.lock .venv/bin/python bench/sandbox --nodes 4 --serve

Figures: `sandbox up` (warm images), `vcluster up` (Ray + vLLM with PP N), the first chat
completion, then each node's memory from the host's cgroups (the node container with the
containers its dockerd runs: Ray and vLLM): resident, page cache (with the node's Docker data
when the sandbox keeps it in memory) and peak; and the machine's available memory.
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
    rss: int
    """Resident memory of the node container and the containers its own dockerd runs."""
    cache: int
    """Their page cache, tmpfs included (the node's Docker data in the `memory` storage mode)."""
    peak: int
    """The highest cgroup usage (page cache included) of those, summed."""


CGROUP_V1 = Path("/sys/fs/cgroup/memory/docker")


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def node_memory(host: str, container: str, node: str) -> NodeMemory:
    """The node's memory from the host's cgroups (v1, Docker's cgroupfs driver, as here): the
    node container's own and that of the containers its dockerd runs, which Docker puts next to
    it under /docker/, not inside it."""
    docker = ["docker", "--host", host]
    own = subprocess.run([*docker, "inspect", "--format", "{{.Id}}", container],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    inner = subprocess.run([*docker, "exec", container, "docker", "ps", "--quiet", "--no-trunc"],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    rss = cache = peak = 0
    for cid in own + inner:
        folder = CGROUP_V1 / cid
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        rss += int(stat["total_rss"])
        cache += int(stat["total_cache"])
        peak += int((folder / "memory.max_usage_in_bytes").read_text())
    return NodeMemory(node, rss, cache, peak)


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
        print(f"    {m.node:<8} resident {m.rss / GiB:5.2f} GiB   cache {m.cache / GiB:5.2f} GiB"
              f"   peak (with cache) {m.peak / GiB:5.2f} GiB")  # fmt: skip
    print(f"    all      resident {sum(m.rss for m in memory) / GiB:5.2f} GiB   cache "
          f"{sum(m.cache for m in memory) / GiB:5.2f} GiB")  # fmt: skip
    print(f"  machine MemAvailable: {before / GiB:5.1f} GiB before, {after / GiB:5.1f} GiB serving")
    return 0
