"""The sandbox's nodes: containers on a private bridge, each with its own sshd and dockerd.

Each node stands in for a GPU server: its own IP address (fixed: .11, .12, ... of the
sandbox's subnet), its own SSH host key (made on the controller and mounted read-only, so
known_hosts comes from the keys themselves), its own Docker engine (Docker-in-Docker with the
flags FACTS.md found to work without --privileged, its /var/lib/docker in a tmpfs or on a named
volume: see storage.py) and a `/dev/shm` large enough for vLLM (the workload's `--ipc=host` is
the node's IPC namespace).
Every Docker object is labelled `io.vcluster.sandbox=<name>`, so `down` finds them all.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
import time
from dataclasses import dataclass

from cluster.errors import VclusterError
from cluster.sandbox.dockerd import LocalDocker
from cluster.sandbox.keys import HostKey
from cluster.sandbox.storage import MEMORY, NodeStorage

SANDBOX_LABEL = "io.vcluster.sandbox"
NODE_LABEL = "io.vcluster.sandbox.node"
SPEC_LABEL = "io.vcluster.sandbox.spec"
STORAGE_LABEL = "io.vcluster.sandbox.storage"
NODE_IMAGE = "vcluster/node:bookworm"
SHM_SIZE = "4g"
NODE_MODEL_CACHE = "/data/hf"
FIRST_HOST = 11
SUBNET_CANDIDATES = [f"172.30.{third}.0/24" for third in range(0, 64)]
NODE_START_TIMEOUT_S = 60.0
"""How long a node may take until its entrypoint says dockerd and sshd run (about 2 s)."""
LOG_LINES = 12
READY_LINE = "vcluster-node: dockerd and sshd are running"
DIND_FLAGS = [
    "--cap-add=ALL",
    "--cap-drop=SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--security-opt",
    "systempaths=unconfined",
    "--volume",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
]


class SandboxError(VclusterError):
    """The sandbox could not be built, started or removed."""


@dataclass(frozen=True)
class SandboxNode:
    name: str  # node-1, node-2, ...
    address: str
    container: str
    volume: str


def network_name(sandbox: str) -> str:
    return f"vcluster-{sandbox}"


def plan_nodes(sandbox: str, count: int, subnet: str) -> list[SandboxNode]:
    """Names and fixed addresses (.11, .12, ... of the subnet), pure."""
    network = ipaddress.IPv4Network(subnet)
    if count + FIRST_HOST > network.num_addresses - 1:
        raise SandboxError(f"{count} nodes do not fit in {subnet}")
    return [
        SandboxNode(
            name=f"node-{i}",
            address=str(network.network_address + FIRST_HOST + i - 1),
            container=f"vcluster-{sandbox}-node-{i}",
            volume=f"vcluster-{sandbox}-node-{i}-docker",
        )
        for i in range(1, count + 1)
    ]


def _docker(local: LocalDocker, *args: str, timeout_s: float = 120.0, check: bool = True) -> str:
    done = subprocess.run(
        local.argv(*args), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and done.returncode != 0:
        raise SandboxError(
            f"`docker {' '.join(args[:3])} ...` failed: {done.stderr.strip()[-400:]}",
            where="localhost",
        )
    return done.stdout


def _inspect(local: LocalDocker, kind: str, name: str) -> dict | None:
    """`docker KIND inspect NAME` as a dict, or None when there is no such object."""
    done = subprocess.run(
        local.argv(kind, "inspect", name), capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        return None
    found = json.loads(done.stdout)
    return found[0] if found else None


def _labels(inspected: dict) -> dict[str, str]:
    """The labels of an inspected container, volume or network."""
    return (inspected.get("Config") or inspected).get("Labels") or {}


def _require_ours(inspected: dict | None, kind: str, name: str, sandbox: str) -> None:
    """An object of that name that is not this sandbox's is never touched: say which it is."""
    if inspected is not None and _labels(inspected).get(SANDBOX_LABEL) != sandbox:
        raise SandboxError(
            f"a Docker {kind} named {name} exists and does not belong to sandbox {sandbox}",
            where="localhost",
            fix=f"remove it (docker {kind} rm {name}) or choose another name with --name",
        )


def running_storage(local: LocalDocker, sandbox: str) -> str | None:
    """Where the sandbox's running nodes keep their Docker data (memory or disk), if any run."""
    label = f"label={SANDBOX_LABEL}={sandbox}"
    output = _docker(
        local, "ps", "--filter", label, "--format", f'{{{{.Label "{STORAGE_LABEL}"}}}}'
    )
    modes = set(output.split())
    return modes.pop() if len(modes) == 1 else None


def labelled(local: LocalDocker, kind: str, sandbox: str) -> list[str]:
    """IDs of the containers, volumes or networks labelled for `sandbox`."""
    label = f"label={SANDBOX_LABEL}={sandbox}"
    if kind == "container":
        output = _docker(local, "ps", "-aq", "--filter", label)
    else:
        output = _docker(local, kind, "ls", "-q", "--filter", label)
    return output.split()


def create_network(local: LocalDocker, sandbox: str) -> str:
    """The sandbox's bridge (kept if it exists) on the first free subnet; returns the subnet."""
    name = network_name(sandbox)
    existing = _inspect(local, "network", name)
    _require_ours(existing, "network", name, sandbox)
    if existing is not None:
        return existing["IPAM"]["Config"][0]["Subnet"]
    taken: list[str] = []
    for subnet in SUBNET_CANDIDATES:
        done = subprocess.run(
            local.argv(
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                subnet,
                "--label",
                f"{SANDBOX_LABEL}={sandbox}",
                name,
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            return subnet
        if "overlap" not in done.stderr:
            raise SandboxError(
                f"docker could not create network {name}: {done.stderr.strip()}", where="localhost"
            )
        taken.append(subnet)
    raise SandboxError(
        f"no free subnet for the sandbox: {taken[0]} to {taken[-1]} are all in use",
        where="localhost",
        fix="remove unused Docker networks (docker network prune)",
    )


@dataclass(frozen=True)
class NodeSettings:
    """What every node of a sandbox is started with, its own address and host key aside."""

    node_image_id: str
    authorized: str  # root's authorized_keys line
    storage: NodeStorage
    workload_image_id: str


def node_spec(node: SandboxNode, host_key: HostKey, settings: NodeSettings) -> str:
    """A hash of everything a running node was started with; equal means it can be kept.

    In memory, a new workload image means a fresh node: its tmpfs holds one image, not two.
    """
    parts = [
        node.address,
        settings.node_image_id,
        host_key.public_line,
        settings.authorized,
        SHM_SIZE,
        *DIND_FLAGS,
        *docker_data_argv(node, settings.storage),
    ]
    if settings.storage.mode == MEMORY:
        parts.append(settings.workload_image_id)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def docker_data_argv(node: SandboxNode, storage: NodeStorage) -> list[str]:
    """The `docker run` arguments that give a node its /var/lib/docker (pure)."""
    if storage.mode == MEMORY:
        # exec: the inner containers' programs live there; the size caps what a node can take.
        return ["--tmpfs", f"/var/lib/docker:exec,size={storage.tmpfs_bytes}"]
    return ["--mount", f"type=volume,source={node.volume},target=/var/lib/docker"]


def start_node(
    local: LocalDocker,
    sandbox: str,
    node: SandboxNode,
    host_key: HostKey,
    settings: NodeSettings,
) -> bool:
    """Start one node container; keep it when it already runs with the same spec.

    Returns True when a container was (re)started. On disk, its Docker volume is kept either
    way, so a restarted node still has the images it had; in memory, a restarted node starts
    empty and is sent the image again.
    """
    spec = node_spec(node, host_key, settings)
    storage = settings.storage
    existing = _inspect(local, "container", node.container)
    _require_ours(existing, "container", node.container, sandbox)
    if existing is not None:
        if existing["State"]["Running"] and _labels(existing).get(SPEC_LABEL) == spec:
            return False
        _docker(local, "rm", "--force", node.container)
    volume = _inspect(local, "volume", node.volume)
    if storage.mode == MEMORY:
        if volume is not None and _labels(volume).get(SANDBOX_LABEL) == sandbox:
            _docker(local, "volume", "rm", "--force", node.volume, timeout_s=300)  # from disk mode
    else:
        _require_ours(volume, "volume", node.volume, sandbox)
        if volume is None:
            _docker(local, "volume", "create", "--label", f"{SANDBOX_LABEL}={sandbox}", node.volume)
    _docker(
        local,
        "run",
        "--detach",
        "--name",
        node.container,
        "--hostname",
        node.name,
        "--network",
        network_name(sandbox),
        "--ip",
        node.address,
        "--label",
        f"{SANDBOX_LABEL}={sandbox}",
        "--label",
        f"{NODE_LABEL}={node.name}",
        "--label",
        f"{SPEC_LABEL}={spec}",
        "--label",
        f"{STORAGE_LABEL}={storage.mode}",
        *DIND_FLAGS,
        "--shm-size",
        SHM_SIZE,
        *docker_data_argv(node, storage),
        "--mount",
        f"type=bind,source={host_key.private},target=/etc/ssh/ssh_host_ed25519_key,readonly",
        "--mount",
        f"type=bind,source={host_key.public},target=/etc/ssh/ssh_host_ed25519_key.pub,readonly",
        "--env",
        f"VCLUSTER_AUTHORIZED_KEYS={settings.authorized}",
        NODE_IMAGE,
    )
    return True


def node_log_tail(local: LocalDocker, node: SandboxNode, lines: int = LOG_LINES) -> str:
    """The last lines of a node container's log, joined on one line."""
    done = subprocess.run(
        local.argv("logs", "--tail", str(lines), node.container),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return " | ".join((done.stdout + done.stderr).strip().splitlines()) or "(no output)"


def wait_until_ready(
    local: LocalDocker, node: SandboxNode, timeout_s: float = NODE_START_TIMEOUT_S
) -> None:
    """Wait for the entrypoint's ready line; a node that stops or stalls fails with its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = _inspect(local, "container", node.container)
        running = state is not None and state["State"]["Running"]
        if running and READY_LINE in node_log_tail(local, node, lines=200):
            return
        if not running or time.monotonic() >= deadline:
            why = "it stopped" if not running else f"not ready within {timeout_s:.0f} s"
            raise SandboxError(
                f"node container {node.container} did not start ({why}): "
                f"{node_log_tail(local, node)}",
                where=node.name,
                fix="see docs/sandbox.md, 'When a node does not start'",
            )
        time.sleep(0.3)


def remove_all(local: LocalDocker, sandbox: str) -> list[str]:
    """Remove every container, volume and network labelled for `sandbox`; what was removed."""
    removed = []
    containers = labelled(local, "container", sandbox)
    if containers:
        _docker(local, "rm", "--force", "--volumes", *containers, timeout_s=300)
        removed.append(f"{len(containers)} container(s)")
    volumes = labelled(local, "volume", sandbox)
    if volumes:
        _docker(local, "volume", "rm", "--force", *volumes, timeout_s=300)
        removed.append(f"{len(volumes)} volume(s)")
    networks = labelled(local, "network", sandbox)
    if networks:
        _docker(local, "network", "rm", *networks)
        removed.append(f"{len(networks)} network(s)")
    return removed


def leftovers(local: LocalDocker, sandbox: str) -> dict[str, list[str]]:
    """What of the sandbox still exists, by kind (all lists empty once it is down)."""
    return {kind: labelled(local, kind, sandbox) for kind in ("container", "volume", "network")}
