"""Rules per host: SSH, Docker and its NVIDIA runtime, /dev/shm, the model cache's disk, the
clocks."""

from __future__ import annotations

from cluster.decide.checks.result import (
    CheckInput,
    CheckResult,
    fails,
    gpu_mode_only,
    passes,
    skips,
    warns,
)
from cluster.decide.python_packages import version_tuple

GIB = 1 << 30

SHM_FAIL_BELOW_BYTES = 1 * GIB

SHM_WARN_BELOW_BYTES = 8 * GIB
"""NCCL and vLLM's workers share memory through /dev/shm (the containers use --ipc=host).
In cpu mode (the sandbox's tiny model, 4 GiB nodes) only the FAIL threshold applies."""

CACHE_FAIL_BELOW_BYTES = 2 * GIB

CACHE_WARN_BELOW_BYTES = 100 * GIB
"""Model weights take tens to hundreds of GiB; the CPU sandbox's tiny model takes little."""

CLOCK_SKEW_WARN_S = 2.0

MIN_DOCKER_VERSION = (19, 3)
"""`docker run --gpus` came with Docker 19.03."""

NVIDIA_RUNTIME = "nvidia"


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def _by_size(
    name: str, node: str, size: int, *, fail_below: int, warn_below: int, detail: str, fix: str
) -> CheckResult:
    """FAIL under `fail_below` bytes, WARN under `warn_below`, else PASS."""
    if size < fail_below:
        return fails(name, node, detail, fix)
    if size < warn_below:
        return warns(name, node, detail, fix)
    return passes(name, node, detail)


def check_ssh(given: CheckInput) -> list[CheckResult]:
    """Every node was reached over SSH and its probe ran to the end."""
    results = []
    for node in given.inventory.nodes:
        name = node.node_name
        facts = given.facts.get(name)
        if facts is None:
            reason = given.unreachable.get(name, "no facts were gathered from this node")
            results.append(
                fails(
                    "ssh",
                    name,
                    reason,
                    f"check that `ssh {node.address}` works with the inventory's user, key "
                    "and known_hosts (`ssh -v` says why not)",
                )
            )
        elif facts.problems:
            results.append(
                warns(
                    "ssh",
                    name,
                    "; ".join(facts.problems),
                    "run the probe again; raise ssh.command_timeout if the host is slow",
                )
            )
        else:
            results.append(passes("ssh", name, f"reached {facts.hostname or node.address}"))
    return results


def _docker_remedy(problem: str) -> str:
    if "not installed" in problem:
        return "install Docker Engine (https://docs.docker.com/engine/install/)"
    if "permission denied" in problem.lower():
        return "add the SSH user to the docker group (`usermod -aG docker USER`), then log in again"
    return "start the daemon (`systemctl enable --now docker`) and check `docker info` on the host"


def check_docker(given: CheckInput) -> list[CheckResult]:
    """The Docker daemon answers on every node, and is recent enough."""
    results = []
    for name, facts in given.probed():
        docker = facts.docker
        if docker.server_version is None:
            problem = docker.problem or "no answer"
            results.append(
                fails(
                    "docker",
                    name,
                    f"Docker daemon not reachable: {problem}",
                    _docker_remedy(problem),
                )
            )
        elif version_tuple(docker.server_version) < MIN_DOCKER_VERSION:
            results.append(
                fails(
                    "docker",
                    name,
                    f"Docker {docker.server_version} is too old",
                    "upgrade Docker Engine to 19.03 or later (`docker run --gpus` needs it)",
                )
            )
        else:
            results.append(passes("docker", name, f"Docker {docker.server_version}"))
    return results


@gpu_mode_only
def check_nvidia_runtime(given: CheckInput) -> list[CheckResult]:
    """Docker can give containers GPUs: the NVIDIA container toolkit is installed."""
    results = []
    for name, facts in given.probed():
        docker = facts.docker
        if NVIDIA_RUNTIME in docker.runtimes:
            results.append(passes("nvidia runtime", name, "Docker has the nvidia runtime"))
        elif docker.nvidia_hooks:
            detail = f"NVIDIA container toolkit found ({docker.nvidia_hooks[0]})"
            results.append(passes("nvidia runtime", name, detail))
        elif not docker.reachable:
            results.append(skips("nvidia runtime", name, "Docker not reachable (see docker)"))
        else:
            runtimes = ", ".join(docker.runtimes) or "none"
            results.append(
                fails(
                    "nvidia runtime",
                    name,
                    f"no NVIDIA container toolkit; Docker's runtimes: {runtimes}",
                    "install nvidia-container-toolkit, run `nvidia-ctk runtime configure "
                    "--runtime=docker` and restart Docker",
                )
            )
    return results


def check_shared_memory(given: CheckInput) -> list[CheckResult]:
    """/dev/shm is large enough for NCCL and vLLM's workers (the containers use --ipc=host)."""
    remedy = "enlarge /dev/shm: `mount -o remount,size=32G /dev/shm` (and in /etc/fstab)"
    warn_below = SHM_WARN_BELOW_BYTES if given.inventory.accelerator == "nvidia" else 0
    results = []
    for name, facts in given.probed():
        if facts.shm is None:
            results.append(warns("shared memory", name, "/dev/shm size unknown", remedy))
            continue
        results.append(
            _by_size(
                "shared memory",
                name,
                facts.shm.size_bytes,
                fail_below=SHM_FAIL_BELOW_BYTES,
                warn_below=warn_below,
                detail=f"/dev/shm is {_gib(facts.shm.size_bytes)}",
                fix=remedy,
            )
        )
    return results


def check_cache_disk(given: CheckInput) -> list[CheckResult]:
    """Free space on the file system that holds the model cache."""
    cache = given.inventory.model_cache
    warn_below = CACHE_WARN_BELOW_BYTES if given.inventory.accelerator == "nvidia" else 0
    remedy = f"free space under {cache}, or point model_cache at a larger disk"
    results = []
    for name, facts in given.probed():
        disk = facts.cache_disk
        if disk is None:
            detail = f"free space at {cache} unknown"
            results.append(warns("cache disk", name, detail, remedy))
            continue
        results.append(
            _by_size(
                "cache disk",
                name,
                disk.free_bytes,
                fail_below=CACHE_FAIL_BELOW_BYTES,
                warn_below=warn_below,
                detail=f"{_gib(disk.free_bytes)} free at {cache} (on {disk.mount_point})",
                fix=remedy,
            )
        )
    return results


def check_clock_skew(given: CheckInput) -> list[CheckResult]:
    """The nodes' clocks agree within a few seconds (logs, Ray's timeouts, TLS)."""
    clocks = {name: facts.clock_s for name, facts in given.probed() if facts.clock_s is not None}
    if len(clocks) < 2:
        return [skips("clock skew", None, "fewer than two clocks read")]
    fastest = max(clocks, key=lambda name: clocks[name])
    slowest = min(clocks, key=lambda name: clocks[name])
    skew = clocks[fastest] - clocks[slowest]
    if skew > CLOCK_SKEW_WARN_S:
        return [
            warns(
                "clock skew",
                None,
                f"{fastest} is {skew:.1f} s ahead of {slowest} (probe latency included)",
                "run NTP (chrony or systemd-timesyncd) on every node",
            )
        ]
    return [passes("clock skew", None, f"within {skew:.1f} s")]
