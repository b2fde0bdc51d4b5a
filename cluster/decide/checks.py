"""Preflight and topology rules: pure functions from facts to PASS / WARN / FAIL / SKIP results.

Each rule reads the inventory and the facts of every node (one probe per host) and returns
results that name the node (None: the whole cluster), say what was found in one line, and
give the remedy. `run_checks` runs the rules that need only the probe's facts; the rules
below it take data gathered by other steps (image IDs, model presence, reachability, Ray).
`up` stops on any FAIL before changing anything; `vcluster check` prints them all.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.markup import escape
from rich.table import Table

from cluster.decide.inventory import Inventory, Model
from cluster.decide.manifest import Item
from cluster.decide.python_packages import version_tuple
from cluster.decide.runtime import ADD_RAY_FIX, Runtime
from cluster.decide.traps import ModelShape, TrapFacts, choose_mitigations
from cluster.errors import VclusterError
from cluster.facts.gpu import GpuTopology
from cluster.facts.host import HostFacts
from cluster.facts.image import ImageFacts

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


class Status(enum.StrEnum):
    """A check's outcome; FAIL stops `up`."""

    PASS = "PASS"  # noqa: S105 (an outcome, not a password)
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """One rule's verdict on one node (or on the cluster when `node` is None)."""

    name: str
    status: Status
    detail: str
    node: str | None = None
    remedy: str | None = None
    data: Mapping[str, Any] | None = None
    """Figures behind the verdict, for `--json` (the collective check's measurements)."""

    def to_dict(self) -> dict[str, Any]:
        """As JSON-able data."""
        data: dict[str, Any] = {
            "name": self.name,
            "node": self.node,
            "status": self.status.value,
            "detail": self.detail,
            "remedy": self.remedy,
        }
        if self.data is not None:
            data["data"] = dict(self.data)
        return data


@dataclass(frozen=True)
class CheckInput:
    """What the rules read: the inventory and each reachable node's facts.

    `unreachable` gives, for nodes that could not be probed, the reason (the SSH error).
    `cluster_running_on_head`: this cluster's own container already runs on the head, so
    its ports are expected to be in use. `runtime`: Ray or not, and vLLM's executor, when the
    image's facts are known (else the inventory's default, with Ray).
    """

    inventory: Inventory
    facts: Mapping[str, HostFacts]
    unreachable: Mapping[str, str] = field(default_factory=dict)
    cluster_running_on_head: bool = False
    runtime: Runtime | None = None

    def probed(self) -> Iterator[tuple[str, HostFacts]]:
        """(node name, facts) of every probed node, in inventory order."""
        for node in self.inventory.nodes:
            if node.node_name in self.facts:
                yield node.node_name, self.facts[node.node_name]


Rule = Callable[[CheckInput], list[CheckResult]]
T = TypeVar("T")


def _pass(name: str, node: str | None, detail: str) -> CheckResult:
    return CheckResult(name, Status.PASS, detail, node)


def _warn(name: str, node: str | None, detail: str, fix: str | None = None) -> CheckResult:
    return CheckResult(name, Status.WARN, detail, node, fix)


def _fail(name: str, node: str | None, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, node, fix)


def _skip(name: str, node: str | None, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail, node)


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def _majority(values: Mapping[str, T]) -> T:
    """The most common value (the first seen among equals)."""
    return Counter(values.values()).most_common(1)[0][0]


def _by_size(
    name: str, node: str, size: int, *, fail_below: int, warn_below: int, detail: str, fix: str
) -> CheckResult:
    """FAIL under `fail_below` bytes, WARN under `warn_below`, else PASS."""
    if size < fail_below:
        return _fail(name, node, detail, fix)
    if size < warn_below:
        return _warn(name, node, detail, fix)
    return _pass(name, node, detail)


def gpu_mode_only(rule: Rule) -> Rule:
    """In `accelerator: cpu` mode the rule gives one SKIP with the reason instead."""

    def checked(given: CheckInput) -> list[CheckResult]:
        if given.inventory.accelerator == "cpu":
            name = rule.__name__.removeprefix("check_").replace("_", " ")
            return [_skip(name, None, "accelerator: cpu, no GPUs to check")]
        return rule(given)

    checked.__name__ = rule.__name__
    checked.__doc__ = rule.__doc__
    return checked


# --- per host ------------------------------------------------------------------------------


def check_ssh(given: CheckInput) -> list[CheckResult]:
    """Every node was reached over SSH and its probe ran to the end."""
    results = []
    for node in given.inventory.nodes:
        name = node.node_name
        facts = given.facts.get(name)
        if facts is None:
            reason = given.unreachable.get(name, "no facts were gathered from this node")
            results.append(
                _fail(
                    "ssh",
                    name,
                    reason,
                    f"check that `ssh {node.address}` works with the inventory's user, key "
                    "and known_hosts (`ssh -v` says why not)",
                )
            )
        elif facts.problems:
            results.append(
                _warn(
                    "ssh",
                    name,
                    "; ".join(facts.problems),
                    "run the probe again; raise ssh.command_timeout if the host is slow",
                )
            )
        else:
            results.append(_pass("ssh", name, f"reached {facts.hostname or node.address}"))
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
                _fail(
                    "docker",
                    name,
                    f"Docker daemon not reachable: {problem}",
                    _docker_remedy(problem),
                )
            )
        elif version_tuple(docker.server_version) < MIN_DOCKER_VERSION:
            results.append(
                _fail(
                    "docker",
                    name,
                    f"Docker {docker.server_version} is too old",
                    "upgrade Docker Engine to 19.03 or later (`docker run --gpus` needs it)",
                )
            )
        else:
            results.append(_pass("docker", name, f"Docker {docker.server_version}"))
    return results


@gpu_mode_only
def check_nvidia_runtime(given: CheckInput) -> list[CheckResult]:
    """Docker can give containers GPUs: the NVIDIA container toolkit is installed."""
    results = []
    for name, facts in given.probed():
        docker = facts.docker
        if NVIDIA_RUNTIME in docker.runtimes:
            results.append(_pass("nvidia runtime", name, "Docker has the nvidia runtime"))
        elif docker.nvidia_hooks:
            detail = f"NVIDIA container toolkit found ({docker.nvidia_hooks[0]})"
            results.append(_pass("nvidia runtime", name, detail))
        elif not docker.reachable:
            results.append(_skip("nvidia runtime", name, "Docker not reachable (see docker)"))
        else:
            runtimes = ", ".join(docker.runtimes) or "none"
            results.append(
                _fail(
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
            results.append(_warn("shared memory", name, "/dev/shm size unknown", remedy))
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
            results.append(_warn("cache disk", name, detail, remedy))
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


# --- GPUs ----------------------------------------------------------------------------------


@gpu_mode_only
def check_gpus(given: CheckInput) -> list[CheckResult]:
    """nvidia-smi answers on every node, with the same GPU count and model everywhere."""
    results = []
    shapes: dict[str, tuple[int, str | None]] = {}
    for name, facts in given.probed():
        gpu = facts.gpu
        if gpu.problem is not None:
            detail = f"{gpu.problem.kind}: {gpu.problem.detail}"
            results.append(_fail("gpus", name, detail, gpu.problem.remedy))
        if gpu.gpus:
            chosen = _chosen_gpus(given.inventory, name, gpu.gpu_count)
            if isinstance(chosen, str):
                results.append(_fail("gpus", name, chosen, "list indices `nvidia-smi -L` shows"))
                continue
            shapes[name] = (chosen, gpu.model_name)
        elif gpu.problem is None:
            detail = "nvidia-smi listed no GPUs"
            results.append(_fail("gpus", name, detail, "run `nvidia-smi` on the host"))
    if not shapes:
        return results
    declared = {
        n.node_name: n.gpus
        for n in given.inventory.nodes
        if n.gpus is not None and n.gpu_ids is None
    }
    # Several models are placed on whatever each node gives: only the GPU model must agree.
    routed = given.inventory.routed
    compared = {name: (0 if routed else count, model) for name, (count, model) in shapes.items()}
    common = _majority(compared)
    for name, (count, model) in shapes.items():
        if compared[name] != common:
            if routed:
                detail = f"{model}, but other nodes have {common[1]}"
                remedy = "a model's ranks need one GPU model: fix this node or leave it out"
            else:
                detail = f"{count} x {model}, but other nodes have {common[0]} x {common[1]}"
                remedy = "tensor parallel = GPUs per node needs identical nodes: fix this node or leave it out"
            results.append(_fail("gpus", name, detail, remedy))
        elif name in declared and declared[name] != count:
            detail = f"the inventory declares {declared[name]} GPUs, nvidia-smi lists {count}"
            remedy = (
                "correct gpus: in the inventory, or the node (a GPU may have fallen off the bus)"
            )
            results.append(_fail("gpus", name, detail, remedy))
        elif not any(r.node == name for r in results):
            results.append(_pass("gpus", name, f"{count} x {model}"))
    return results


def _chosen_gpus(inventory: Inventory, node: str, found: int) -> int | str:
    """How many GPUs the node gives the cluster (its `gpu_ids`, or all), or what is wrong."""
    ids = next(n.gpu_ids for n in inventory.nodes if n.node_name == node)
    if ids is None:
        return found
    absent = [i for i in ids if i >= found]
    if absent:
        return f"gpu_ids names GPU {', '.join(map(str, absent))}, but nvidia-smi lists {found}"
    return len(ids)


@gpu_mode_only
def check_driver_version(given: CheckInput) -> list[CheckResult]:
    """The same NVIDIA driver on every node (WARN: NCCL across versions is a gamble)."""
    versions = {
        name: facts.gpu.driver_version for name, facts in given.probed() if facts.gpu.driver_version
    }
    if not versions:
        return [_skip("driver version", None, "no driver version known")]
    common = _majority(versions)
    odd = {name: version for name, version in versions.items() if version != common}
    if not odd:
        return [_pass("driver version", None, f"{common} on every node")]
    return [
        _warn(
            "driver version",
            name,
            f"driver {version}, other nodes {common}",
            f"install driver {common} here (one version everywhere avoids NCCL surprises)",
        )
        for name, version in odd.items()
    ]


@gpu_mode_only
def check_gpu_errors(given: CheckInput) -> list[CheckResult]:
    """No GPU reports uncorrected ECC errors, an error value, or MIG mode."""
    results = []
    for name, facts in given.probed():
        if not facts.gpus:
            continue  # check_gpus says why
        ecc = [f"GPU{g.index} ({g.ecc_uncorrected})" for g in facts.gpus if g.ecc_uncorrected]
        broken = [f"GPU{g.index} {', '.join(g.errors)}" for g in facts.gpus if g.errors]
        mig = [f"GPU{g.index}" for g in facts.gpus if g.mig_enabled]
        if ecc:
            results.append(
                _fail(
                    "gpu errors",
                    name,
                    f"uncorrected ECC errors: {', '.join(ecc)}",
                    "drain the node; reset the GPU (`nvidia-smi -r -i N`) or reboot, and have "
                    "it replaced if errors come back",
                )
            )
        if broken:
            results.append(
                _fail(
                    "gpu errors",
                    name,
                    f"nvidia-smi reports errors: {'; '.join(broken)}",
                    "reset the GPU (`nvidia-smi -r -i N`) or reboot the host; "
                    "`dmesg | grep -i xid` says what happened",
                )
            )
        if mig:
            results.append(
                _fail(
                    "gpu errors",
                    name,
                    f"MIG mode enabled on {', '.join(mig)}",
                    "tensor parallel needs whole GPUs: `nvidia-smi -i N -mig 0` and reset the GPU",
                )
            )
        if not (ecc or broken or mig):
            results.append(_pass("gpu errors", name, "no ECC errors, no error values"))
    return results


@gpu_mode_only
def check_gpus_idle(given: CheckInput) -> list[CheckResult]:
    """No other process holds GPU memory (vLLM takes 90% of it by default)."""
    results = []
    for name, facts in given.probed():
        if not facts.gpus:
            continue
        processes = facts.gpu.processes
        if not processes:
            results.append(_pass("gpus idle", name, "no process holds GPU memory"))
            continue
        by_uuid = {g.uuid: g.index for g in facts.gpus}
        held = ", ".join(
            f"{p.process_name} (pid {p.pid}, GPU{by_uuid.get(p.gpu_uuid, '?')}, "
            f"{p.used_memory_mib} MiB)"
            for p in processes[:4]
        )
        more = f" and {len(processes) - 4} more" if len(processes) > 4 else ""
        results.append(
            _warn(
                "gpus idle",
                name,
                f"GPU memory held by {held}{more}",
                "stop those processes (`nvidia-smi` lists them), or vLLM may run out of GPU memory",
            )
        )
    return results


def _tensor_parallel_groups(given: CheckInput, gpu_count: int) -> list[list[int]] | None:
    """The GPU indices each tensor-parallel group uses on a node; None when TP spans nodes."""
    tensor_parallel = given.inventory.primary_model.tensor_parallel
    size = gpu_count if tensor_parallel == "auto" else tensor_parallel
    if size > gpu_count:
        return None
    return [list(range(start, start + size)) for start in range(0, gpu_count - size + 1, size)]


def _describe_topology(topology: GpuTopology) -> str:
    return f"{topology.interconnect} between {len(topology.gpu_indices)} GPUs"


@gpu_mode_only
def check_topology(given: CheckInput) -> list[CheckResult]:
    """NVLink or PCIe per node; WARN when tensor parallel spans GPUs without NVLink."""
    results = []
    for name, facts in given.probed():
        topology = facts.gpu.topology
        if topology is None:
            if facts.gpus:
                results.append(_skip("topology", name, "nvidia-smi topo -m gave no matrix"))
            continue
        groups = _tensor_parallel_groups(given, len(topology.gpu_indices))
        if groups is None:
            results.append(
                _warn(
                    "topology",
                    name,
                    f"tensor parallel {given.inventory.primary_model.tensor_parallel} spans nodes: "
                    "its all-reduces cross the network",
                    "set tensor_parallel to the GPUs per node, pipeline_parallel to nodes",
                )
            )
            continue
        slow = [pair for group in groups for pair in topology.pairs_without_nvlink(group)]
        if slow:
            shown = ", ".join(slow[:3]) + (f" and {len(slow) - 3} more" if len(slow) > 3 else "")
            results.append(
                _warn(
                    "topology",
                    name,
                    f"{_describe_topology(topology)}: tensor parallel runs over PCIe ({shown})",
                    "expect lower throughput; a smaller tensor_parallel within NVLinked "
                    "GPUs and a larger pipeline_parallel may serve faster",
                )
            )
        else:
            results.append(_pass("topology", name, _describe_topology(topology)))
    return results


# --- fabrics: vLLM's known traps, InfiniBand/RoCE ------------------------------------------


def _model_tensor_parallel(given: CheckInput, model: Model) -> int:
    """The model's TP as the plan will make it: given, or the GPUs per node."""
    if model.tensor_parallel != "auto":
        return model.tensor_parallel
    if given.inventory.accelerator == "cpu":
        return 1
    counts = [
        len(node.gpu_ids) if node.gpu_ids is not None else len(given.facts[node.node_name].gpus)
        for node in given.inventory.nodes
        if node.node_name in given.facts
    ]
    return min(counts, default=1)


def check_known_traps(given: CheckInput) -> list[CheckResult]:
    """vLLM's known traps (cluster/decide/traps.py) that apply to this cluster: WARN with what `up`
    changes for each, or that the inventory turned it off."""
    inventory = given.inventory
    runtime = given.runtime
    facts = TrapFacts(
        vllm_version=runtime.vllm_version if runtime else None,
        accelerator=inventory.accelerator,
        multicast={
            name: (f.fabric.multicast.verdict, f.fabric.multicast.explain())
            for name, f in given.probed()
        },
        nodes=tuple(n.node_name for n in inventory.nodes),
        image_has_ray=runtime.image_has_ray if runtime else None,
    )
    results = []
    for model in inventory.model_list:
        shape = ModelShape(_model_tensor_parallel(given, model), tuple(model.args),
                           model.served if inventory.routed else None)  # fmt: skip
        for found in choose_mitigations(facts, shape):
            if found.fragment is None:
                results.append(_pass("known trap", None, f"{found.trap}: {found.why}; "
                                     f"{found.action}"))  # fmt: skip
            elif found.trap in inventory.traps_off:
                results.append(
                    _warn(
                        "known trap", None,
                        f"{found.trap} is turned off (traps:), but applies: {found.why}",
                        f"{found.warn}; remove traps.{found.trap}, or add {found.action} to "
                        f"the model's args yourself ({found.source})",
                    )
                )  # fmt: skip
            else:
                done = (
                    f"`up` cannot add it ({found.skipped}): add {found.action} to the args"
                    if found.skipped
                    else f"`up` adds {found.action}"
                    + (f" (the user's own {', '.join(found.kept)} kept)" if found.kept else "")
                )
                results.append(
                    _warn(
                        "known trap", None, f"{found.trap}: {found.why}",
                        f"{found.warn}. {done}; `traps: {{{found.trap}: off}}` turns it off. "
                        f"Source: {found.source}",
                    )
                )  # fmt: skip
    if not results:
        version = facts.vllm_version or "not known yet"
        results.append(_pass("known trap", None, f"none applies (vLLM {version})"))
    return results


@gpu_mode_only
def check_infiniband(given: CheckInput) -> list[CheckResult]:
    """InfiniBand/RoCE between nodes: HCAs Active on every node, one link layer, the same count,
    /dev/infiniband present, GPUDirect RDMA (nvidia_peermem; a WARN without)."""
    inventory = given.inventory
    name = "infiniband"
    if len(inventory.nodes) < 2:
        return [_skip(name, None, "one node: NCCL's traffic stays inside it")]
    if inventory.env.get("NCCL_IB_DISABLE") == "1":
        return [_skip(name, None, "NCCL_IB_DISABLE=1 in env: NCCL uses TCP sockets")]
    named = inventory.network.ib_hcas
    read = {n: f.fabric.infiniband for n, f in given.probed() if f.fabric.infiniband.read}
    active = {
        n: [p for p in ib.active_ports if named is None or p.hca in named or p.name in named]
        for n, ib in read.items()
    }
    results: list[CheckResult] = []
    if named is None and not any(active.values()):
        detail = "no active HCA on any node: NCCL uses TCP sockets between the nodes"
        return [_pass(name, None, detail)]
    counts = {n: len(ports) for n, ports in active.items()}
    up_fix = (
        "bring the port up (`ibstat`: cable, switch, and a subnet manager for InfiniBand), "
        + ("or drop it from network.ib_hcas" if named else "or set env NCCL_IB_DISABLE: '1'")
    )
    for node, ib in read.items():
        ports = active[node]
        if named:
            missing = [h for h in named if not any(h in (p.hca, p.name) for p in ports)]
            for hca in missing:
                seen = [p for p in ib.ports if hca in (p.hca, p.name)]
                state = ", ".join(f"{p.name} {p.state}/{p.physical_state}" for p in seen)
                detail = f"network.ib_hcas names {hca}: " + (
                    f"not active here ({state})" if seen else "no such HCA here"
                )
                results.append(_fail(name, node, detail, up_fix))
        elif not ports:
            others = ", ".join(f"{n}: {c}" for n, c in counts.items() if c)
            detail = f"no active HCA here, while other nodes have some ({others})"
            results.append(_fail(name, node, detail, up_fix))
            continue
        if ports and not any(f.startswith("uverbs") for f in ib.device_files):
            results.append(
                _fail(
                    name, node, "active HCAs but no /dev/infiniband/uverbs*: the containers "
                    "could not open them",
                    "load the RDMA user-space modules (`modprobe ib_uverbs rdma_ucm`)",
                )
            )  # fmt: skip
        roce = [p.name for p in ports if p.roce and p.roce_v2_gid_index() is None]
        if roce:
            results.append(
                _warn(
                    name, node, f"no RoCE v2 GID with an address on {', '.join(roce)}",
                    "give the RoCE interface an IP address; NCCL needs a RoCE v2 GID",
                )
            )  # fmt: skip
        peer = given.facts[node].fabric.peer_memory
        if ports and peer is False:
            results.append(
                _warn(
                    name, node, "nvidia_peermem is not loaded: no GPUDirect RDMA through it "
                    "(NCCL stages through host memory unless DMA-BUF works: open kernel "
                    "module, Linux 5.12+)",
                    "`modprobe nvidia_peermem`, and list it in /etc/modules-load.d/",
                )
            )  # fmt: skip
    layers = {n: "/".join(sorted({p.link_layer or "?" for p in ps})) for n, ps in active.items()
              if ps}  # fmt: skip
    if len(set(layers.values())) > 1:
        shown = ", ".join(f"{n}: {layer}" for n, layer in layers.items())
        results.append(
            _fail(name, None, f"the nodes' HCAs differ in link layer ({shown})",
                  "use the same fabric on every node (name its HCAs in network.ib_hcas)")
        )  # fmt: skip
    if len({c for c in counts.values() if c}) > 1:
        shown = ", ".join(f"{n}: {c}" for n, c in counts.items())
        results.append(
            _warn(name, None, f"active HCA ports differ in number ({shown})",
                  "NCCL uses as many rails as the node with the fewest; check the cabling")
        )  # fmt: skip
    if not any(r.status in (Status.FAIL, Status.WARN) for r in results):
        for node, ports in active.items():
            shown = ", ".join(f"{p.name} ({p.link_layer}, {p.rate})" for p in ports)
            results.append(_pass(name, node, f"{len(ports)} active: {shown}"))
    return results


# --- network -------------------------------------------------------------------------------


def check_head_ports(given: CheckInput) -> list[CheckResult]:
    """The ports the head will listen on (Ray, vLLM, the mp rendezvous) are free."""
    head = given.inventory.head.node_name
    facts = given.facts.get(head)
    if facts is None:
        return []
    ports = given.inventory.ports
    ray, executor = uses_ray(given.inventory, given.runtime)
    wanted = {"the endpoint": ports.vllm}
    if not given.inventory.routed:
        wanted["vLLM (loopback)"] = ports.models
    if ray:
        wanted["Ray"] = ports.ray
    if executor == "mp":
        wanted["torch.distributed"] = ports.master
    listed = ", ".join(f"{what} {port}" for what, port in wanted.items())
    busy = ", ".join(f"{w} {p}" for w, p in wanted.items() if p in facts.listening_ports)
    if not busy:
        return [_pass("head ports", head, f"free: {listed}")]
    if given.cluster_running_on_head:
        detail = f"in use by this cluster's container: {busy}"
        return [_pass("head ports", head, detail)]
    return [
        _fail(
            "head ports",
            head,
            f"already in use on the head: {busy}",
            "stop what listens there (`ss -ltnp`), or choose other ports: in the inventory",
        )
    ]


def check_api_key(given: CheckInput) -> list[CheckResult]:
    """The endpoint has a users' key, or the inventory says on purpose that it has none."""
    inventory = given.inventory
    if inventory.secrets.api_key is not None:
        return [_pass("api key", None, "every route of the endpoint but /health needs the key")]
    if inventory.router.allow_anonymous:
        return [
            _warn(
                "api key",
                None,
                "router.allow_anonymous: anyone who reaches the endpoint uses the models",
                "set secrets.api_key (env:NAME or file:/path) unless the network is yours alone",
            )
        ]
    return [
        _fail(
            "api key",
            None,
            "no secrets.api_key: anyone who reaches the endpoint would use the models",
            "set secrets.api_key: env:NAME or file:/path (or router.allow_anonymous: true)",
        )
    ]


def check_route_to_head(given: CheckInput) -> list[CheckResult]:
    """The interface each node reaches the head by: NCCL/Gloo's interface and VLLM_HOST_IP's."""
    configured = given.inventory.network.interface
    results = []
    for name, facts in given.probed():
        route = facts.route
        if route.interface is None:
            status = Status.WARN if configured else Status.FAIL
            detail = f"no route to the head found: {route.problem}"
            remedy = "check the head's address and this node's routing (`ip route get HEAD`)"
            if configured is None:
                remedy += ", or set network.interface in the inventory"
            results.append(CheckResult("route to head", status, detail, name, remedy))
        elif configured and route.interface != configured:
            results.append(
                _warn(
                    "route to head",
                    name,
                    f"routes to the head via {route.interface}, network.interface is {configured}",
                    "check network.interface: NCCL and Gloo would use an interface "
                    "the route to the head does not",
                )
            )
        else:
            source = f", source {route.source_address}" if route.source_address else ""
            results.append(_pass("route to head", name, f"via {route.interface}{source}"))
    return results


def check_clock_skew(given: CheckInput) -> list[CheckResult]:
    """The nodes' clocks agree within a few seconds (logs, Ray's timeouts, TLS)."""
    clocks = {name: facts.clock_s for name, facts in given.probed() if facts.clock_s is not None}
    if len(clocks) < 2:
        return [_skip("clock skew", None, "fewer than two clocks read")]
    fastest = max(clocks, key=lambda name: clocks[name])
    slowest = min(clocks, key=lambda name: clocks[name])
    skew = clocks[fastest] - clocks[slowest]
    if skew > CLOCK_SKEW_WARN_S:
        return [
            _warn(
                "clock skew",
                None,
                f"{fastest} is {skew:.1f} s ahead of {slowest} (probe latency included)",
                "run NTP (chrony or systemd-timesyncd) on every node",
            )
        ]
    return [_pass("clock skew", None, f"within {skew:.1f} s")]


RULES: tuple[Rule, ...] = (
    check_api_key,
    check_ssh,
    check_docker,
    check_nvidia_runtime,
    check_gpus,
    check_driver_version,
    check_gpu_errors,
    check_gpus_idle,
    check_topology,
    check_known_traps,
    check_infiniband,
    check_shared_memory,
    check_cache_disk,
    check_head_ports,
    check_route_to_head,
    check_clock_skew,
)
"""The rules that need only the probe's facts, in the order they are shown."""


def run_checks(given: CheckInput) -> list[CheckResult]:
    """Every rule's results, in rule order."""
    return [result for rule in RULES for result in rule(given)]


# --- rules over data that other steps gather -----------------------------------------------


def check_image(inventory: Inventory, image_ids: Mapping[str, str | None]) -> list[CheckResult]:
    """The inventory's image on every node with one ID; `image_ids[node]` None: not there.

    A node without it is fine (`up` copies it over SSH); different IDs under one name are not.
    """
    present = {name: image_id for name, image_id in image_ids.items() if image_id}
    missing = [name for name, image_id in image_ids.items() if not image_id]
    if not present:
        return [
            _warn(
                "image",
                None,
                f"{inventory.image} is on no node",
                "`up` will try to pull it, then to copy it from this machine; "
                "or `docker load` it on one node",
            )
        ]
    common = _majority(present)
    results = [
        _fail(
            "image",
            name,
            f"{inventory.image} is {image_id[:19]} here, {common[:19]} on the others",
            f"remove or re-tag it here (`docker rmi {inventory.image}`) so `up` copies the "
            "common one",
        )
        for name, image_id in present.items()
        if image_id != common
    ]
    if missing:
        detail = f"{inventory.image} missing on {', '.join(missing)}: `up` will copy it"
        results.append(_warn("image", None, detail))
    if not results:
        detail = f"{inventory.image} {common[:19]} on every node"
        results.append(_pass("image", None, detail))
    return results


def check_runtime(
    inventory: Inventory,
    facts: ImageFacts | None,
    runtime: Runtime | None,
    probe_error: VclusterError | None = None,
) -> list[CheckResult]:
    """What the image holds, and whether the cluster it leads to is what the inventory asks.

    An image without Ray is fine when `up` can derive a Ray-ready one, or when vLLM's own
    multi-node mode is allowed (a WARN: the Ray parts are then off); it FAILs only when
    `executor: ray` is asked for and Ray cannot be had, or the image could not be probed.
    """
    if probe_error is not None:
        return [_fail("executor", probe_error.where, f"{inventory.image}: {probe_error.message}",
                      probe_error.fix or "")]  # fmt: skip
    if facts is None or runtime is None:
        return [_skip("executor", None, f"{inventory.image} is on no node yet: `up` probes it "
                      "once it has copied it")]  # fmt: skip
    summary = facts.summary()
    if facts.vllm is None:
        return [
            _fail(
                "executor", None, f"{inventory.image} has no vLLM ({summary})",
                "name a vLLM image (vllm/vllm-openai:TAG, or one built on it) in image:",
            )
        ]  # fmt: skip
    if runtime.problem is not None:
        return [_fail("executor", None, f"{runtime.problem} ({summary})", runtime.fix or "")]
    if runtime.fallback:
        return [
            _warn(
                "executor", None, f"{summary}: {runtime.reason}",
                f"for a Ray cluster: {ADD_RAY_FIX}; executor: mp says this is intended",
            )
        ]  # fmt: skip
    cluster = "Ray cluster" if runtime.ray else "no Ray cluster"
    detail = f"{summary}: {cluster}, vLLM executor {runtime.executor}; {runtime.reason}"
    return [_pass("executor", None, detail)]


def check_model_present(
    inventory: Inventory, present: Mapping[str, bool], served: Model | None = None
) -> list[CheckResult]:
    """The model (the first by default) in every node's cache: required for a local path, else
    downloaded at start."""
    model = (served or inventory.primary_model).name
    local = model.startswith("/")
    missing = [name for name, found in present.items() if not found]
    if not missing:
        return [_pass("model", None, f"{model} in every node's cache")]
    if local:
        return [
            _fail(
                "model",
                name,
                f"{model} is not on this node",
                f"copy the model to {model} on every node (e.g. rsync from a node that has it)",
            )
            for name in missing
        ]
    if len(missing) == len(present):
        detail = f"{model} is in no node's cache: each node downloads it at start"
        remedy = (
            "make sure the nodes reach the Hugging Face hub (and secrets.hf_token for gated models)"
        )
        return [_warn("model", None, detail, remedy)]
    return [
        _warn(
            "model",
            name,
            f"{model} not downloaded here (other nodes have it)",
            f"download it here too (`hf download {model}`) so every node serves the same files",
        )
        for name in missing
    ]


def check_model_files(
    served: str, items: Sequence[Item], states: Mapping[str, Mapping[str, str]]
) -> list[CheckResult]:
    """Per node, the files of a model with a `source`: all there and verified, or which lack.

    A WARN, not a FAIL: `up` sends what lacks before vLLM starts (`vcluster models pull` too).
    """
    files = [item for item in items if item.kind == "file" and item.source is not None]
    results = []
    for node, found in states.items():
        bad = [_shown(item) for item in files if found.get(item.path) != "ok"]
        if not bad:
            results.append(_pass("model files", node, f"{served}: {len(files)} file(s) verified"))
            continue
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        changed = [i for i in files if found.get(i.path) in ("size", "sha256")]
        what = f"{len(changed)} differ from the source, " if changed else ""
        results.append(
            _warn(
                "model files", node,
                f"{served}: {len(bad)} of {len(files)} file(s) missing or wrong ({what}{shown})",
                "`vcluster up` or `vcluster models pull` sends them (only those)",
            )
        )  # fmt: skip
    return results


def _shown(item: Item) -> str:
    """A model file as its source folder names it (a hub blob is named by its sha256)."""
    return (item.source or item.path).rsplit("/", 1)[-1]


def uses_ray(inventory: Inventory, runtime: Runtime | None) -> tuple[bool, str]:
    """(whether the nodes form a Ray cluster, vLLM's executor): the runtime's, or by default."""
    if runtime is None:
        return True, inventory.default_executor
    return runtime.ray, runtime.executor


def head_port(inventory: Inventory, runtime: Runtime | None) -> int:
    """The port the workers meet the head at first: Ray's, or vLLM's rendezvous without Ray."""
    return inventory.ports.ray if uses_ray(inventory, runtime)[0] else inventory.ports.master


def check_workers_reach_head(
    inventory: Inventory, reached: Mapping[str, str | None], runtime: Runtime | None = None
) -> list[CheckResult]:
    """Each worker opened a TCP connection to the head's Ray (or rendezvous) port.

    `reached[worker]` is None when it connected, else the error the worker saw.
    """
    port = head_port(inventory, runtime)
    head = inventory.head.address
    results = []
    for name, error in reached.items():
        if error is None:
            results.append(_pass("reach head", name, f"{head}:{port} reached"))
        else:
            results.append(
                _fail(
                    "reach head",
                    name,
                    f"cannot reach {head}:{port}: {error}",
                    f"open TCP {port} and the ports Ray/NCCL use between the nodes in the "
                    "firewall (or security group), and check the route",
                )
            )
    return results


def check_ray_nodes(
    facts: Mapping[str, HostFacts], ray_gpus: Mapping[str, float | None]
) -> list[CheckResult]:
    """Ray's view against the facts: every node alive in Ray with the GPUs nvidia-smi lists.

    `ray_gpus[node]` is the GPUs Ray reports for the node, None when Ray has no alive node there.
    """
    results = []
    for name, gpus in ray_gpus.items():
        listed = facts[name].gpu.gpu_count if name in facts else None
        if gpus is None:
            results.append(
                _fail(
                    "ray nodes",
                    name,
                    "not alive in Ray",
                    "read the node container's log (`vcluster logs --node NAME`)",
                )
            )
        elif listed is not None and gpus != listed:
            results.append(
                _fail(
                    "ray nodes",
                    name,
                    f"Ray sees {gpus:g} GPUs, nvidia-smi {listed}",
                    "check that the container got the GPUs (`--gpus all`, the nvidia runtime)",
                )
            )
        else:
            results.append(_pass("ray nodes", name, f"alive with {gpus:g} GPUs"))
    return results


# --- output --------------------------------------------------------------------------------

_STYLES = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red", Status.SKIP: "dim"}


def failed(results: list[CheckResult]) -> list[CheckResult]:
    """The results that FAIL."""
    return [result for result in results if result.status is Status.FAIL]


def exit_code(results: list[CheckResult]) -> int:
    """1 when any check FAILs, else 0."""
    return 1 if failed(results) else 0


def results_as_dicts(results: list[CheckResult]) -> list[dict[str, Any]]:
    """The results as JSON-able data, for `--json`."""
    return [result.to_dict() for result in results]


def results_table(results: list[CheckResult]) -> Table:
    """The results as a rich table: status, check, node, detail, and the fix when not PASS."""
    table = Table(show_lines=False)
    for column in ("status", "check", "node", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for result in results:
        table.add_row(
            f"[{_STYLES[result.status]}]{result.status.value}[/]",
            escape(result.name),
            escape(result.node or "cluster"),
            escape(result.detail),  # details hold `ray[default]`, paths, ...: text, not markup
            escape(result.remedy or "") if result.status is not Status.PASS else "",
        )
    return table
