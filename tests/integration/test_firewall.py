"""The firewall installed and removed over real SSH, in the lab's network namespaces (each has
its own filter table), then tried with real connections from this machine: from its address
on the lab's bridge (not a node) and from a second address there that the inventory names as
a node (connections between the lab's namespaces cross the bridge, where the machine's own
FORWARD policy may drop them: Docker's does)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cluster.decide.checks import Status
from cluster.decide.firewall import EPHEMERAL_CHAIN
from cluster.decide.inventory import Inventory, load_inventory
from cluster.nodes.session import Session
from cluster.steps.base import SilentReporter
from cluster.steps.context import UpContext
from cluster.steps.firewall import firewall_results, install_firewall, remove_firewall
from tests.support.ssh_lab import SshLab

CHAIN = "VCLUSTER-fwlab"
EPHEMERAL_PORT = 45001
"""Inside the kernel's default ephemeral range (32768-60999), like vLLM's internal sockets."""

LISTEN = """\
import socket, sys, time
sockets = []
for address, port in (("::", 29501), (sys.argv[1], 45001), ("0.0.0.0", 8000)):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen()
    sockets.append(server)
print("listening", flush=True)
time.sleep(600)
"""

CONNECT = """\
import socket, sys
source = (sys.argv[3], 0) if len(sys.argv) > 3 else None
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), 3, source).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print("failed", exc)
"""


NODE_OFFSET = 250
"""The second address of this machine on the lab's bridge, named as a node (no sshd answers
there: `up` skips a node it cannot reach, its address is still a node's)."""


def node_address(lab: SshLab) -> str:
    return str(lab.subnet.network_address + NODE_OFFSET)


def lab_inventory(lab: SshLab, tmp_path: Path, **changes: object) -> Inventory:
    document = {
        "cluster": "fwlab",
        "image": "vcluster/vllm-cpu:0.32.0",
        "accelerator": "cpu",
        "ssh": {"user": "root", "key_file": str(lab.client_key),
                "known_hosts": str(lab.known_hosts)},
        "nodes": [{"name": "node01", "address": lab.host("node01").address, "role": "head"},
                  {"name": "node02", "address": lab.host("node02").address},
                  {"name": "peer", "address": node_address(lab)}],
        "model_cache": "/data/hf",
        "network": {"interface": "eth0"},
        "model": {"name": "/data/hf/models/tiny-llama"},
        **changes,
    }  # fmt: skip
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_inventory(path)


def in_namespace(lab: SshLab, host: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", lab.host(host).namespace, *argv]


def connect(address: str, port: int, source: str | None = None) -> str:
    """What a TCP connection from this machine (from `source`) to address:port got."""
    argv = [sys.executable, "-c", CONNECT, address, str(port), *([source] if source else [])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def rules(lab: SshLab, host: str, tool: str = "iptables") -> str:
    command = in_namespace(lab, host, tool, "-w", "10", "-S")
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def listening(ssh_lab: SshLab) -> Iterator[str]:
    """node01 listens on its rendezvous port, an ephemeral port and the endpoint."""
    address = ssh_lab.host("node01").address
    process = subprocess.Popen(
        in_namespace(ssh_lab, "node01", sys.executable, "-c", LISTEN, address),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "listening"
        yield address
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def session(ssh_lab: SshLab, tmp_path: Path) -> Iterator[Session]:
    """node01 and node02 connected; `peer` (this machine's second address) is not."""
    inventory = lab_inventory(ssh_lab, tmp_path)
    second = ["ip", "addr", "add", f"{node_address(ssh_lab)}/32", "dev", ssh_lab.bridge]
    subprocess.run(second, check=True, timeout=30)
    with Session(inventory) as session:
        try:
            assert set(session.open().failed) == {"peer"}
            yield session
        finally:  # the lab is shared: leave no rule and no address behind
            remove_firewall(inventory, session)
            subprocess.run(["ip", "addr", "del", *second[3:]], check=True, timeout=30)


def test_only_the_nodes_reach_the_protected_ports_until_down(ssh_lab, session, listening):
    inventory = session.inventory
    detail = install_firewall(UpContext(inventory, session, SilentReporter()))
    assert detail.startswith(f"{CHAIN} installed on node01, node02 (IPv4, IPv6)"), detail

    head, peer = listening, node_address(ssh_lab)
    assert connect(head, 29501).startswith("refused")  # this machine: not a node
    assert connect(head, EPHEMERAL_PORT).startswith("refused")
    assert connect(head, 8000).startswith("connected")  # the endpoint stays open
    assert connect(head, 29501, source=peer).startswith("connected")  # a node
    assert connect(head, EPHEMERAL_PORT, source=peer).startswith("connected")

    (first, second) = firewall_results(inventory, session, {})
    assert (first.node, first.status) == ("node01", Status.PASS), first
    assert first.detail.endswith(f"refused: 29501, {EPHEMERAL_PORT}"), first.detail
    assert (second.node, second.status) == ("node02", Status.PASS), second

    again = install_firewall(UpContext(inventory, session, SilentReporter()))
    assert again.startswith(f"{CHAIN} unchanged"), again
    assert rules(ssh_lab, "node01").count(f"-A INPUT -j {CHAIN}") == 1

    assert remove_firewall(inventory, session) == f"{CHAIN} removed from node01, node02"
    for host in ("node01", "node02"):
        for tool in ("iptables", "ip6tables"):
            assert "VCLUSTER" not in rules(ssh_lab, host, tool)
    assert connect(head, 29501).startswith("connected")
    assert remove_firewall(inventory, session) == f"no {CHAIN} on any node"


def test_a_chain_flushed_by_someone_else_fails_the_check_and_up_restores_it(
    ssh_lab, session, listening
):
    inventory = session.inventory
    install_firewall(UpContext(inventory, session, SilentReporter()))
    flush = in_namespace(ssh_lab, "node01", "iptables", "-w", "10", "-F", CHAIN)
    subprocess.run(flush, check=True, timeout=30)

    (first, _) = firewall_results(inventory, session, {})
    assert first.status is Status.FAIL
    assert f"{CHAIN} holds other rules than `up` installs" in first.detail
    assert connect(listening, 29501).startswith("connected")

    detail = install_firewall(UpContext(inventory, session, SilentReporter()))
    assert detail.startswith(f"{CHAIN} installed on node01 ("), detail
    assert connect(listening, 29501).startswith("refused")


def test_with_the_firewall_off_up_removes_a_chain_left_from_before(ssh_lab, session, tmp_path):
    install_firewall(UpContext(session.inventory, session, SilentReporter()))
    off = lab_inventory(ssh_lab, tmp_path, network={"interface": "eth0", "firewall": False})
    detail = install_firewall(UpContext(off, session, SilentReporter()))
    assert detail == f"off (network.firewall: false); {CHAIN} removed from node01, node02"
    assert EPHEMERAL_CHAIN not in rules(ssh_lab, "node01")
    results = firewall_results(off, session, {})
    assert {r.status for r in results} == {Status.WARN}
