"""One run's connections to the cluster's hosts: SSH (and Docker over it), opened in parallel."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import docker
import docker.errors
import requests.exceptions

from cluster.decide.inventory import Inventory, JumpHost, Node
from cluster.errors import VclusterError
from cluster.nodes.transport.docker import docker_client
from cluster.nodes.transport.fanout import FanOut, fan_out
from cluster.nodes.transport.ssh import SshConnection, SshTarget, SshTimeouts, connect

T = TypeVar("T")
DEFAULT_USER = "root"


def ssh_timeouts(inventory: Inventory) -> SshTimeouts:
    return SshTimeouts(connect=inventory.ssh.connect_timeout, command=inventory.ssh.command_timeout)


def ssh_target(inventory: Inventory, node: Node) -> SshTarget:
    """How to reach `node`: its own `ssh:` settings over the inventory's defaults."""
    defaults, override = inventory.ssh, node.ssh
    user = override.user or defaults.user or DEFAULT_USER
    key_file = override.key_file or defaults.key_file
    known_hosts = override.known_hosts or defaults.known_hosts
    jump = override.jump or defaults.jump
    return SshTarget(
        name=node.node_name,
        host=node.address,
        port=override.port or defaults.port or 22,
        user=user,
        key_file=Path(key_file).expanduser() if key_file else None,
        known_hosts=Path(known_hosts).expanduser() if known_hosts else None,
        trust_on_first_use=defaults.trust_on_first_use,
        jump=_jump_target(jump, user, key_file, known_hosts, defaults.trust_on_first_use),
    )


def _jump_target(
    jump: JumpHost | None,
    user: str,
    key_file: str | None,
    known_hosts: str | None,
    trust_on_first_use: bool,
) -> SshTarget | None:
    if jump is None:
        return None
    return SshTarget(
        name=f"jump {jump.address}",
        host=jump.address,
        port=jump.port,
        user=jump.user or user,
        key_file=Path(key_file).expanduser() if key_file else None,
        known_hosts=Path(known_hosts).expanduser() if known_hosts else None,
        trust_on_first_use=trust_on_first_use,
    )


class Session:
    """Open SSH connections to some of the inventory's nodes, by node name; a context manager.

    `open` connects to every node in parallel and keeps the ones that answered; `failed` holds
    the others' errors, so callers decide whether a partial cluster is enough (status) or not
    (up). Docker clients ride on the same connections and are made on first use.
    """

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.connections: dict[str, SshConnection] = {}
        self.failed: dict[str, VclusterError] = {}
        self._docker: dict[str, docker.DockerClient] = {}
        self._lock = threading.Lock()

    def open(self, nodes: Iterable[Node] | None = None) -> FanOut[SshConnection]:
        """Connect to `nodes` (all by default) in parallel; return every node's outcome."""
        wanted = [n for n in (nodes or self.inventory.nodes) if n.node_name not in self.connections]
        targets = [ssh_target(self.inventory, n) for n in wanted]
        timeouts = ssh_timeouts(self.inventory)
        outcome = fan_out(targets, lambda t: connect(t, timeouts), name=lambda t: t.name)
        self.connections.update(outcome.succeeded)
        self.failed.update(outcome.failed)
        return outcome

    def ssh(self, node: str) -> SshConnection:
        return self.connections[node]

    def docker(self, node: str) -> docker.DockerClient:
        """The Docker SDK on `node`, over its SSH connection."""
        with self._lock:
            if node not in self._docker:
                self._docker[node] = docker_client(
                    self.connections[node], timeout_s=self.inventory.ssh.command_timeout
                )
            return self._docker[node]

    def on_each(self, action: Callable[[str], T], nodes: Iterable[str] | None = None) -> FanOut[T]:
        """Run `action(node name)` on every connected node (or `nodes`) in parallel.

        A node whose Docker daemon does not answer (stopped, restarting) is that node's
        failure, said in one line, not a bug with a traceback.
        """
        names = list(nodes) if nodes is not None else list(self.connections)

        def on_node(node: str) -> T:
            try:
                return action(node)
            except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
                if isinstance(exc, docker.errors.APIError) and not exc.is_server_error():
                    raise
                raise VclusterError(
                    f"Docker did not answer ({type(exc).__name__}: {str(exc)[:200]})",
                    where=node,
                    fix="check `docker info` on the host (the daemon may be restarting), "
                    "then run the command again",
                ) from None

        return fan_out(names, on_node, name=lambda n: n)

    def close(self) -> None:
        for client in self._docker.values():
            client.close()
        for connection in self.connections.values():
            connection.close()
        self._docker.clear()
        self.connections.clear()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
