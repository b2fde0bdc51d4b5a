"""Preflight and topology rules: pure functions from facts to PASS / WARN / FAIL / SKIP results.

Each rule looks at the facts of every node (gathered by one probe per host) and returns results
that name the node, say what was found in one line, and give the remedy. `up` stops on any FAIL
before changing anything; `vcluster check` prints them all.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cluster.facts.host import HostFacts
from cluster.inventory import Inventory

GIB = 1 << 30
MIN_SHM_BYTES = 1 * GIB
MIN_CACHE_FREE_BYTES = 20 * GIB
MAX_CLOCK_SKEW_S = 2.0
NVIDIA_RUNTIME = "nvidia"


class Status(enum.StrEnum):
    PASS = "PASS"  # noqa: S105 (a check outcome, not a password)
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    node: str | None = None
    remedy: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "node": self.node,
            "status": self.status.value,
            "detail": self.detail,
            "remedy": self.remedy,
        }


@dataclass(frozen=True)
class CheckInput:
    """What the rules read: the inventory, each node's facts, and what already runs."""

    inventory: Inventory
    facts: Mapping[str, HostFacts]
    cluster_running_on_head: bool = False
    """vcluster's own container runs on the head: its ports are expected to be in use."""


Rule = Callable[[CheckInput], list[CheckResult]]


def _gpu_mode_only(rule: Rule) -> Rule:
    def checked(given: CheckInput) -> list[CheckResult]:
        if given.inventory.accelerator == "cpu":
            name = rule.__name__.removeprefix("check_").replace("_", " ")
            return [CheckResult(name, Status.SKIP, "accelerator: cpu (no GPUs to check)")]
        return rule(given)

    checked.__name__ = rule.__name__
    return checked


def check_docker(given: CheckInput) -> list[CheckResult]:
    results = []
    for node, facts in given.facts.items():
        if facts.docker_version:
            results.append(
                CheckResult("docker", Status.PASS, f"engine {facts.docker_version}", node)
            )
        else:
            results.append(
                CheckResult(
                    "docker",
                    Status.FAIL,
                    f"Docker engine not reachable: {facts.docker_error or 'docker not installed'}",
                    node,
                    "install Docker and start it; the SSH user must be in the docker group",
                )
            )
    return results


@_gpu_mode_only
def check_nvidia_runtime(given: CheckInput) -> list[CheckResult]:
    results = []
    for node, facts in given.facts.items():
        if not facts.docker_version:
            continue
        if NVIDIA_RUNTIME in facts.docker_runtimes:
            results.append(CheckResult("nvidia runtime", Status.PASS, "present", node))
        else:
            results.append(
                CheckResult(
                    "nvidia runtime",
                    Status.FAIL,
                    f"Docker has no nvidia runtime (runtimes: {', '.join(facts.docker_runtimes) or 'none'})",
                    node,
                    "install nvidia-container-toolkit, run `nvidia-ctk runtime configure "
                    "--runtime=docker` and restart docker",
                )
            )
    return results


@_gpu_mode_only
def check_gpus(given: CheckInput) -> list[CheckResult]:
    """nvidia-smi works everywhere, and every node has the same GPU count and model."""
    results = []
    seen: dict[str, tuple[int, str | None]] = {}
    for node, facts in given.facts.items():
        gpu = facts.gpu
        if gpu is None:
            results.append(
                CheckResult(
                    "gpus", Status.FAIL, "nvidia-smi is not installed", node,
                    "install the NVIDIA driver and its utilities",
                )
            )  # fmt: skip
            continue
        if gpu.error is not None:
            results.append(
                CheckResult("gpus", Status.FAIL, gpu.error.detail, node, gpu.error.remedy)
            )
            continue
        seen[node] = (gpu.gpu_count, gpu.model_name)
    shapes = Counter(seen.values())
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        for node, shape in seen.items():
            if shape != common:
                results.append(
                    CheckResult(
                        "gpus",
                        Status.FAIL,
                        f"{shape[0]} x {shape[1]}, the other nodes {common[0]} x {common[1]}",
                        node,
                        "tensor parallel = GPUs per node needs identical nodes: fix or leave out this node",
                    )
                )
    declared = {n.node_name: n.gpus for n in given.inventory.nodes if n.gpus is not None}
    for node, (count, model) in seen.items():
        if node in declared and declared[node] != count:
            results.append(
                CheckResult(
                    "gpus", Status.FAIL,
                    f"inventory declares {declared[node]} GPUs, nvidia-smi lists {count}", node,
                    "fix gpus: in the inventory, or the node (a GPU may have fallen off the bus)",
                )
            )  # fmt: skip
        elif not any(r.node == node for r in results):
            results.append(CheckResult("gpus", Status.PASS, f"{count} x {model}", node))
    return results


@_gpu_mode_only
def check_driver_versions(given: CheckInput) -> list[CheckResult]:
    versions = {
        node: f.gpu.driver_version
        for node, f in given.facts.items()
        if f.gpu is not None and f.gpu.driver_version
    }
    if len(set(versions.values())) <= 1:
        only = next(iter(versions.values()), "unknown")
        return [CheckResult("driver version", Status.PASS, f"{only} on every node")]
    common = Counter(versions.values()).most_common(1)[0][0]
    return [
        CheckResult(
            "driver version",
            Status.WARN,
            f"driver {version}, the others {common}",
            node,
            "use one driver version on every node (NCCL across versions is untested)",
        )
        for node, version in versions.items()
        if version != common
    ]


@_gpu_mode_only
def check_gpu_health(given: CheckInput) -> list[CheckResult]:
    """Uncorrected ECC errors fail; GPUs already holding other processes' memory warn."""
    results = []
    for node, facts in given.facts.items():
        if facts.gpu is None:
            continue
        ecc = [g.index for g in facts.gpu.gpus if g.ecc_uncorrected]
        if ecc:
            results.append(
                CheckResult(
                    "gpu health", Status.FAIL,
                    f"uncorrected ECC errors on GPU {', '.join(map(str, ecc))}", node,
                    "drain the node; reset the GPU (nvidia-smi -r) or have it replaced",
                )
            )  # fmt: skip
        if facts.gpu_processes:
            names = sorted({p.process_name or str(p.pid) for p in facts.gpu_processes})
            results.append(
                CheckResult(
                    "gpu health", Status.WARN,
                    f"{len(facts.gpu_processes)} process(es) hold GPU memory: {', '.join(names)[:120]}",
                    node, "stop them, or vLLM may run out of GPU memory",
                )
            )  # fmt: skip
        if not ecc and not facts.gpu_processes:
            results.append(CheckResult("gpu health", Status.PASS, "no ECC errors, GPUs idle", node))
    return results


def check_shared_memory(given: CheckInput) -> list[CheckResult]:
    results = []
    for node, facts in given.facts.items():
        if facts.shm_bytes is None:
            results.append(CheckResult("shared memory", Status.WARN, "/dev/shm size unknown", node))
        elif facts.shm_bytes < MIN_SHM_BYTES:
            results.append(
                CheckResult(
                    "shared memory", Status.FAIL,
                    f"/dev/shm is {facts.shm_bytes / GIB:.2f} GiB; vLLM needs more with --ipc=host",
                    node, "enlarge /dev/shm (mount -o remount,size=16g /dev/shm)",
                )
            )  # fmt: skip
        else:
            results.append(
                CheckResult(
                    "shared memory", Status.PASS, f"/dev/shm {facts.shm_bytes / GIB:.1f} GiB", node
                )
            )
    return results


def check_model_cache_disk(given: CheckInput) -> list[CheckResult]:
    results = []
    cache = given.inventory.model_cache
    for node, facts in given.facts.items():
        free = facts.disk_free_bytes
        if free is None:
            results.append(
                CheckResult("cache disk", Status.WARN, f"free space at {cache} unknown", node)
            )
        elif free < MIN_CACHE_FREE_BYTES and given.inventory.accelerator == "nvidia":
            results.append(
                CheckResult(
                    "cache disk", Status.WARN,
                    f"{free / GIB:.1f} GiB free at {cache} ({facts.disk_path})", node,
                    "free space: model weights need tens to hundreds of GiB",
                )
            )  # fmt: skip
        else:
            results.append(
                CheckResult(
                    "cache disk", Status.PASS, f"{free / GIB:.0f} GiB free at {cache}", node
                )
            )
    return results


def check_head_ports(given: CheckInput) -> list[CheckResult]:
    head = given.inventory.head.node_name
    facts = given.facts.get(head)
    if facts is None:
        return []
    ports = given.inventory.ports
    wanted = {"ray": ports.ray, "vllm": ports.vllm}
    if given.inventory.executor == "mp":
        wanted["master"] = ports.master
    busy = {name: port for name, port in wanted.items() if port in facts.listening_ports}
    if not busy:
        listed = ", ".join(f"{n} {p}" for n, p in wanted.items())
        return [CheckResult("head ports", Status.PASS, f"free: {listed}", head)]
    if given.cluster_running_on_head:
        return [CheckResult("head ports", Status.PASS, "in use by this cluster's container", head)]
    taken = ", ".join(f"{name} {port}" for name, port in busy.items())
    return [
        CheckResult(
            "head ports", Status.FAIL, f"already in use on the head: {taken}", head,
            "stop what listens there (ss -ltnp), or change ports: in the inventory",
        )
    ]  # fmt: skip


def check_interfaces(given: CheckInput) -> list[CheckResult]:
    """The interface each node routes to the head by: what NCCL/Gloo will use."""
    configured = given.inventory.network.interface
    results = []
    for node, facts in given.facts.items():
        if facts.route_interface is None:
            results.append(
                CheckResult(
                    "interface", Status.FAIL if configured is None else Status.WARN,
                    "no route to the head's address", node,
                    "check the head address and the node's routing (ip route get HEAD)",
                )
            )  # fmt: skip
        elif configured and facts.route_interface not in (configured, "lo"):
            results.append(
                CheckResult(
                    "interface", Status.WARN,
                    f"routes to the head via {facts.route_interface}, inventory says {configured}",
                    node, "check network.interface: NCCL/Gloo would use a NIC the route avoids",
                )
            )  # fmt: skip
        else:
            used = configured or facts.route_interface
            results.append(
                CheckResult("interface", Status.PASS, f"{used} (source {facts.route_source})", node)
            )
    return results


def check_clock_skew(given: CheckInput) -> list[CheckResult]:
    clocks = {node: f.clock for node, f in given.facts.items() if f.clock is not None}
    if len(clocks) < 2:
        return [CheckResult("clock skew", Status.PASS, "one node")]
    skew = max(clocks.values()) - min(clocks.values())
    if skew > MAX_CLOCK_SKEW_S:
        fastest = max(clocks, key=lambda n: clocks[n])
        slowest = min(clocks, key=lambda n: clocks[n])
        return [
            CheckResult(
                "clock skew", Status.WARN,
                f"{skew:.1f}s between {fastest} and {slowest} (includes probe latency)", None,
                "run NTP/chrony on every node",
            )
        ]  # fmt: skip
    return [CheckResult("clock skew", Status.PASS, f"at most {skew:.1f}s")]


RULES: tuple[Rule, ...] = (
    check_docker,
    check_nvidia_runtime,
    check_gpus,
    check_driver_versions,
    check_gpu_health,
    check_shared_memory,
    check_model_cache_disk,
    check_head_ports,
    check_interfaces,
    check_clock_skew,
)


def run_checks(given: CheckInput) -> list[CheckResult]:
    """Every rule's results, in rule order."""
    return [result for rule in RULES for result in rule(given)]


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status is Status.FAIL]
