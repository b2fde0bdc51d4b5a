"""Where each sandbox node keeps its Docker data: in memory (a tmpfs) or on disk (a volume).

Loading the workload image into every node's fresh Docker is most of a warm `sandbox up`, and
that load is file system work: Docker unpacks the archive, then every layer (72,000 files),
for all nodes at once. On the project's 2-core machine two nodes load in about 40 s into a
tmpfs and about 60 s into volumes on ext4 (docs/sandbox.md). A node's data lives only as long
as the node anyway (`down` deletes it), so memory is the default wherever the nodes' data fits
with room to spare; `--node-storage disk` asks for volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AUTO = "auto"
MEMORY: Literal["memory"] = "memory"
DISK: Literal["disk"] = "disk"
CHOICES = (AUTO, MEMORY, DISK)

GIB = 1 << 30
RUNTIME_RESERVE_BYTES = 2 * GIB
"""What a node's processes need beside its Docker data: Ray and a vLLM CPU worker with its
1 GiB KV cache."""
MEMORY_SHARE = 0.6
"""Memory mode only while all nodes' needs stay under this share of the machine's memory."""


@dataclass(frozen=True)
class NodeStorage:
    mode: Literal["memory", "disk"]
    tmpfs_bytes: int  # the size of each node's tmpfs in memory mode, 0 on disk
    reason: str

    def describe(self) -> str:
        """How the nodes step reports it: `Docker data in memory (tmpfs of 6 GiB per node)`."""
        if self.mode == MEMORY:
            return f"Docker data in memory (tmpfs of {self.tmpfs_bytes // GIB} GiB per node)"
        return "Docker data on disk (a volume per node)"


def tmpfs_size(image_bytes: int) -> int:
    """Each node's tmpfs: three times the image, in whole GiB.

    `docker load` holds the image twice at its peak (the unpacked archive in Docker's temporary
    directory and the layers); the third is room for the containers' layers and caches.
    """
    return -(-3 * image_bytes // GIB) * GIB


def memory_need(image_bytes: int) -> int:
    """The most one node in memory mode holds in practice: the load's peak and its processes.

    At the peak the image is there twice; afterwards once, plus what its containers write.
    """
    return 2 * image_bytes + RUNTIME_RESERVE_BYTES


def choose_node_storage(
    requested: str,
    nodes: int,
    image_bytes: int,
    machine_memory_bytes: int,
    running_mode: str | None = None,
) -> NodeStorage:
    """Memory or disk for the nodes' Docker data (pure).

    `auto` takes memory when the nodes fit in MEMORY_SHARE of the machine's total memory. A
    sandbox whose nodes already run on disk (`running_mode`) stays there: `up` again, or with
    another `--nodes`, does not move it; one in memory moves to disk only when it no longer fits.
    """
    if requested not in CHOICES:
        raise ValueError(f"node storage must be one of {', '.join(CHOICES)}, got {requested!r}")
    size = tmpfs_size(image_bytes)
    need = nodes * memory_need(image_bytes)
    budget = int(machine_memory_bytes * MEMORY_SHARE)
    share = f"{MEMORY_SHARE:.0%} of this machine's memory ({budget / GIB:.0f} GiB)"
    if requested == DISK:
        return NodeStorage(DISK, 0, "--node-storage disk")
    if requested == MEMORY:
        beyond = (
            ""
            if need <= budget
            else f"; {nodes} node(s) may need {need / GIB:.0f} GiB, over {share}"
        )
        return NodeStorage(MEMORY, size, "--node-storage memory" + beyond)
    if running_mode == DISK:
        return NodeStorage(
            DISK, 0, "the running nodes keep theirs on disk (--node-storage memory moves them)"
        )
    if need <= budget:
        return NodeStorage(
            MEMORY, size, f"{nodes} node(s) need about {need / GIB:.0f} GiB, within {share}"
        )
    return NodeStorage(
        DISK,
        0,
        f"{nodes} node(s) would need about {need / GIB:.0f} GiB, more "
        f"than {share}; --node-storage memory overrides",
    )


def mem_total_bytes(meminfo: str) -> int:
    """MemTotal from the text of /proc/meminfo, in bytes."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemTotal line in /proc/meminfo")
