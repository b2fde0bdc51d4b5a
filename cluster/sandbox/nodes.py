"""The sandbox's nodes: containers on a private bridge, each with its own sshd and dockerd.

Each node stands in for a GPU server: its own IP address, its own SSH host key (made here, so
the known_hosts file is written from the keys themselves, never trusted blindly), its own
Docker engine (Docker-in-Docker with the flags FACTS.md found to work without --privileged) and
a `/dev/shm` large enough for vLLM (the workload's `--ipc=host` is the node's IPC namespace).
Every Docker object is labelled `io.vcluster.sandbox=<name>`, so `down` finds them all.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import VclusterError
from cluster.sandbox.dockerd import LocalDocker

SANDBOX_LABEL = "io.vcluster.sandbox"
NODE_IMAGE = "vcluster/node:bookworm"
SHM_SIZE = "4g"
NODE_MODEL_CACHE = "/data/hf"
FIRST_HOST = 11
SUBNET_CANDIDATES = [f"172.30.{third}.0/24" for third in range(0, 32)]
SSH_READY_TIMEOUT_S = 90.0
LOG_LINES = 15
DIND_FLAGS = [
    "--cap-add=ALL", "--cap-drop=SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined",
    "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
]  # fmt: skip


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
    """Names and fixed addresses: .11, .12, ... of the subnet."""
    network = ipaddress.IPv4Network(subnet)
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


def _labelled(local: LocalDocker, kind: str, sandbox: str) -> list[str]:
    label = f"label={SANDBOX_LABEL}={sandbox}"
    if kind == "container":
        output = _docker(local, "ps", "-aq", "--filter", label)
    else:
        output = _docker(local, kind, "ls", "-q", "--filter", label)
    return output.split()


def create_network(local: LocalDocker, sandbox: str) -> str:
    """The sandbox's bridge on the first free candidate subnet; returns the subnet."""
    name = network_name(sandbox)
    existing = _docker(local, "network", "ls", "-q", "--filter", f"name=^{name}$").split()
    if existing:
        inspected = json.loads(_docker(local, "network", "inspect", name))[0]
        if inspected["Labels"].get(SANDBOX_LABEL) != sandbox:
            raise SandboxError(
                f"a Docker network named {name} exists and is not this sandbox's",
                where="localhost",
                fix=f"remove it (docker network rm {name}) or use another sandbox name",
            )
        return inspected["IPAM"]["Config"][0]["Subnet"]
    taken: list[str] = []
    for subnet in SUBNET_CANDIDATES:
        done = subprocess.run(
            local.argv(
                "network", "create", "--driver", "bridge", "--subnet", subnet,
                "--label", f"{SANDBOX_LABEL}={sandbox}", name,
            ),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return subnet
        if "overlap" not in done.stderr:
            raise SandboxError(
                f"docker could not create network {name}: {done.stderr.strip()}", where="localhost"
            )
        taken.append(subnet)
    raise SandboxError(
        f"no free subnet for the sandbox (tried {taken[0]} to {taken[-1]})",
        where="localhost",
        fix="remove unused Docker networks (docker network prune)",
    )


def make_host_key(keys_dir: Path, node: SandboxNode) -> str:
    """An ed25519 host key for the node, made here; returns its public line."""
    key = keys_dir / node.name / "ssh_host_ed25519_key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node.name, "-f", str(key)],
            check=True,
            capture_output=True,
        )
    return key.with_suffix(".pub").read_text().strip()


def run_node(
    local: LocalDocker, sandbox: str, node: SandboxNode, keys_dir: Path, authorized_key: str
) -> None:
    """Start one node container (replacing a stopped leftover of the same name)."""
    _docker(local, "rm", "-f", node.container, check=False)
    _docker(local, "volume", "create", "--label", f"{SANDBOX_LABEL}={sandbox}", node.volume)
    key = keys_dir / node.name / "ssh_host_ed25519_key"
    _docker(
        local,
        "run", "--detach", "--name", node.container, "--hostname", node.name,
        "--network", network_name(sandbox), "--ip", node.address,
        "--label", f"{SANDBOX_LABEL}={sandbox}",
        *DIND_FLAGS,
        "--shm-size", SHM_SIZE,
        "--mount", f"type=volume,source={node.volume},target=/var/lib/docker",
        "--label", f"{SANDBOX_LABEL}.node={node.name}",
        "--volume", f"{key}:/etc/ssh/ssh_host_ed25519_key:ro",
        "--volume", f"{key}.pub:/etc/ssh/ssh_host_ed25519_key.pub:ro",
        "--env", f"VCLUSTER_AUTHORIZED_KEYS={authorized_key}",
        NODE_IMAGE,
    )  # fmt: skip


def node_log_tail(local: LocalDocker, node: SandboxNode) -> str:
    done = subprocess.run(
        local.argv("logs", "--tail", str(LOG_LINES), node.container),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return " | ".join((done.stdout + done.stderr).strip().splitlines()) or "(no output)"


def is_running(local: LocalDocker, node: SandboxNode) -> bool:
    output = _docker(
        local, "inspect", "--format", "{{.State.Running}}", node.container, check=False
    )
    return output.strip() == "true"


def wait_until_running(local: LocalDocker, node: SandboxNode, timeout_s: float = 30.0) -> None:
    """The node's entrypoint says its dockerd and sshd run; else its log tail in the error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_running(local, node):
            break
        if "dockerd and sshd are running" in node_log_tail(local, node):
            return
        time.sleep(0.5)
    raise SandboxError(
        f"node container {node.container} did not start: {node_log_tail(local, node)}",
        where=node.name,
        fix="see docs/sandbox.md (Docker-in-Docker needs cgroup v1/v2 access and these caps)",
    )


def remove_all(local: LocalDocker, sandbox: str) -> list[str]:
    """Remove every container, volume and network labelled for `sandbox`; what was removed."""
    removed = []
    containers = _labelled(local, "container", sandbox)
    if containers:
        _docker(local, "rm", "--force", "--volumes", *containers, timeout_s=300)
        removed.append(f"{len(containers)} container(s)")
    volumes = _labelled(local, "volume", sandbox)
    node_volumes = [
        v
        for v in _docker(local, "volume", "ls", "-q").split()
        if v.startswith(f"vcluster-{sandbox}-node-") and v.endswith("-docker")
    ]
    volumes = sorted(set(volumes) | set(node_volumes))
    if volumes:
        _docker(local, "volume", "rm", "--force", *volumes, timeout_s=300)
        removed.append(f"{len(volumes)} volume(s)")
    networks = _labelled(local, "network", sandbox)
    if networks:
        _docker(local, "network", "rm", *networks)
        removed.append(f"{len(networks)} network(s)")
    return removed


def leftovers(local: LocalDocker, sandbox: str) -> dict[str, list[str]]:
    """What of the sandbox still exists, by kind (empty lists once it is down)."""
    return {kind: _labelled(local, kind, sandbox) for kind in ("container", "volume", "network")}
