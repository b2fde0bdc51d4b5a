"""Looking into a sandbox from outside: its nodes over vcluster's own SSH transport (the
sandbox's key and strict known_hosts) or as the local Docker's containers, where their Docker
keeps its data, and what the local Docker still holds under the sandbox's label."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cluster.decide.inventory import Inventory, Node, load_inventory
from cluster.nodes.transport.ssh import SshConnection, SshTarget, SshTimeouts, connect
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.nodes import SANDBOX_LABEL
from cluster.sandbox.sandbox import Sandbox


def connect_nodes(sandbox: Sandbox) -> dict[str, SshConnection]:
    """A connection to each node of the sandbox, by node name (the caller closes them)."""
    inventory = load_inventory(sandbox.inventory)
    opened = {}
    for node in inventory.nodes:
        target = SshTarget(
            name=node.name,
            host=node.address,
            key_file=Path(inventory.ssh.key_file),
            known_hosts=Path(inventory.ssh.known_hosts),
        )
        opened[node.name] = connect(target, SshTimeouts(connect=5, command=60))
    return opened


def docker_data_fs(connection: SshConnection) -> str:
    """The file system type under a node's /var/lib/docker: tmpfs, or ext2/ext3 for a volume."""
    return connection.run(["stat", "-f", "-c", "%T", "/var/lib/docker"], check=True).stdout.strip()


def labelled(kind: str, sandbox: str) -> list[str]:
    """The IDs of the local Docker's containers, volumes or networks that belong to `sandbox`."""
    local = ensure_local_docker()
    label = f"label={SANDBOX_LABEL}={sandbox}"
    argv = ["ps", "-aq", "--filter", label] if kind == "container" else [kind, "ls", "-q"]
    if kind != "container":
        argv += ["--filter", label]
    done = subprocess.run(local.argv(*argv), capture_output=True, text=True, check=True)
    return done.stdout.split()


def on_node(cluster: Inventory, node: Node, *argv: str) -> str:
    """argv run in the node's container (the node itself, not vcluster's container on it)."""
    local = ensure_local_docker()
    container = f"vcluster-{cluster.cluster}-{node.node_name}"
    done = subprocess.run(
        local.argv("exec", container, *argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=local.env(),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
