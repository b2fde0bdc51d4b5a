"""Faults injected for real on a running sandbox cluster, and the wait for its first answer.

Shared by the healing end-to-end tests and `bench/heal`. Every fault goes through vcluster's own
SSH transport to the node (a sandbox node is a server with its own Docker); nothing here runs a
vcluster command, so what happens after a fault is the cluster's own doing.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import openai

from cluster.decide.inventory import Inventory
from cluster.decide.plan import SUPERVISOR_STATE_DIR, container_name
from cluster.nodes.session import Session
from cluster.remote.supervisor import STATE_FILE
from cluster.sandbox.dockerd import ensure_local_docker


class Nodes:
    """Commands on the cluster's nodes and in their containers."""

    def __init__(self, inventory: Inventory, session: Session) -> None:
        self.inventory = inventory
        self.session = session
        self.container = container_name(inventory.cluster)

    def on_node(self, node: str, argv: list[str]) -> str:
        return self.session.ssh(node).run(argv, check=True).stdout

    def in_container(self, node: str, argv: list[str]) -> str:
        return self.on_node(node, ["docker", "exec", self.container, *argv])

    def supervisor_report(self, node: str) -> dict:
        path = f"{SUPERVISOR_STATE_DIR}/{STATE_FILE}"
        return json.loads(self.in_container(node, ["cat", path]))


@contextmanager
def nodes_of(inventory: Inventory) -> Iterator[Nodes]:
    with Session(inventory) as session:
        session.open()
        yield Nodes(inventory, session)


def kill_api_server(nodes: Nodes) -> None:
    """`kill -9` of vLLM's API server (the `vllm serve` process) on the head."""
    head = nodes.inventory.head.node_name
    leader = nodes.supervisor_report(head)["pid"]
    nodes.in_container(head, ["kill", "-9", str(leader)])


def kill_engine_core(nodes: Nodes) -> None:
    """`kill -9` of vLLM's engine core process on the head."""
    head = nodes.inventory.head.node_name
    engine = nodes.in_container(head, ["pgrep", "-f", "^VLLM::EngineCore"]).split()
    if not engine:
        raise AssertionError("no VLLM::EngineCore process on the head")
    nodes.in_container(head, ["kill", "-9", engine[0]])


def crash_worker_container(nodes: Nodes) -> None:
    """The worker's container crashes: its first process is killed from the node (no `docker`
    command, which Docker would count as a deliberate stop)."""
    worker = nodes.inventory.workers[0].node_name
    pid = nodes.on_node(worker, ["docker", "inspect", "-f", "{{.State.Pid}}", nodes.container])
    nodes.on_node(worker, ["kill", "-9", pid.strip()])


DAEMON_RESTART_TIMEOUT_S = 120.0


def restart_worker_docker(nodes: Nodes) -> None:
    """The worker node's Docker daemon stops (SIGTERM, as `systemctl restart docker` does; it
    stops its containers first) and the node starts it again, as systemd's Restart=always does
    on a server. Returns once a new daemon runs: the fault has then fully happened."""
    worker = nodes.inventory.workers[0].node_name
    before = nodes.on_node(worker, ["pgrep", "-x", "dockerd"]).split()
    nodes.on_node(worker, ["pkill", "-TERM", "-x", "dockerd"])
    deadline = time.monotonic() + DAEMON_RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        now = nodes.session.ssh(worker).run(["pgrep", "-x", "dockerd"]).stdout.split()
        if now and now != before:
            return
        time.sleep(0.5)
    raise AssertionError(f"{worker}'s Docker daemon did not start again")


FAULTS: dict[str, Callable[[Nodes], None]] = {
    "kill -9 of the API server": kill_api_server,
    "kill -9 of the engine core": kill_engine_core,
    "the worker's container crashed": crash_worker_container,
    "the worker's Docker daemon restarted": restart_worker_docker,
}


def seconds_to_first_chat(inventory: Inventory, started: float, timeout_s: float) -> float | None:
    """Poll with chat completions until one is answered: seconds since `started`, or None."""
    client = openai.OpenAI(
        base_url=f"http://{inventory.head.address}:{inventory.ports.vllm}/v1",
        api_key=inventory.secrets.api_key.resolve() if inventory.secrets.api_key else "none",
        timeout=30,
        max_retries=0,
    )
    served = inventory.primary_model.served
    while time.monotonic() < started + timeout_s:
        try:
            reply = client.chat.completions.create(
                model=served, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            if reply.choices[0].message.content is not None:
                return time.monotonic() - started
        except openai.OpenAIError:
            pass
        time.sleep(1)
    return None


@contextmanager
def link_cut(node_container: str, head_address: str) -> Iterator[None]:
    """Reject everything the node sends to the head, inside the node's network namespace."""
    local = ensure_local_docker()
    rule = ["OUTPUT", "-d", head_address, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]
    subprocess.run(local.argv("exec", node_container, "iptables", "-I", *rule), check=True)
    try:
        yield
    finally:
        subprocess.run(local.argv("exec", node_container, "iptables", "-D", *rule), check=True)
