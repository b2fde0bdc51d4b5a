"""Nothing unauthenticated is reachable from outside the cluster (docs/firewall.md).

"Outside" is this machine: it is on the sandbox's bridge with an address that is not a
node's (it reaches the nodes' sshd there). While the cluster serves, the head's rendezvous and
the nodes' internal ports (vLLM's ZMQ, gloo: the ephemeral range) refuse it, the endpoint
answers it, and a node still reaches them. (Ray's own ports require the cluster's token and
are not the firewall's: test_security.py.) What `down` leaves is in test_down.py.
"""

from __future__ import annotations

import json
import socket

import pytest

from cluster.decide.firewall import PortSpan, open_ports, protected_ports
from cluster.decide.inventory import Inventory, Node
from cluster.remote.supervisor import TCP_LISTEN, parse_tcp_table
from tests.support.cli import vcluster
from tests.support.sandbox_nodes import on_node

pytestmark = [pytest.mark.e2e, pytest.mark.stage("real")]

RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
CONNECT = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
except OSError as exc:
    print("failed", type(exc).__name__)
"""


def exposed_ports(cluster: Inventory, node: Node) -> list[int]:
    """The node's listening ports that have no authentication of their own, where a
    connection to the node's address arrives: the cluster's protected ports and the kernel's
    ephemeral range (the ranks' ZMQ, gloo), less the endpoint, SSH and Ray's token ports."""
    low, high = map(int, on_node(cluster, node, "cat", RANGE).split())
    tables = on_node(cluster, node, "sh", "-c", "cat /proc/net/tcp; echo; cat /proc/net/tcp6")
    rows = [row for text in tables.split("\n\n") for row in parse_tcp_table(text)]
    guarded = [*protected_ports(cluster), PortSpan(low, high, "ephemeral")]
    opened = open_ports(cluster, 22)
    return sorted(
        {
            port
            for address, port, _, _, state, _ in rows
            if state == TCP_LISTEN
            and address in ("0.0.0.0", "::", node.address)
            and any(port in span for span in guarded)
            and not any(port in span for span in opened)
        }
    )


def connect(address: str, port: int) -> str:
    try:
        socket.create_connection((address, port), timeout=5).close()
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"failed {type(exc).__name__}"
    return "connected"


def test_from_outside_the_cluster_the_rendezvous_and_internal_ports_refuse(cluster):
    head, worker = cluster.head, cluster.workers[0]
    head_ports, worker_ports = exposed_ports(cluster, head), exposed_ports(cluster, worker)
    assert cluster.ports.master in head_ports, head_ports  # vLLM's rendezvous (executor mp)
    assert len(worker_ports) >= 3, worker_ports  # the worker's ranks: ZMQ, gloo
    for node, ports in ((head, head_ports), (worker, worker_ports)):
        seen = {port: connect(node.address, port) for port in ports}
        assert set(seen.values()) == {"refused"}, (node.node_name, seen)
    assert connect(head.address, cluster.ports.vllm) == "connected"  # the endpoint


def test_a_node_still_reaches_the_heads_rendezvous(cluster):
    head, worker = cluster.head, cluster.workers[0]
    argv = ["python3", "-c", CONNECT, head.address, str(cluster.ports.master)]
    assert on_node(cluster, worker, *argv).strip() == "connected"
    assert connect(head.address, cluster.ports.master) == "refused"


def test_check_sees_the_firewall_refuse_this_machine(cluster):
    checked = vcluster("check", "--json", str(cluster.source))
    rows = [row for row in json.loads(checked.stdout) if row["name"] == "firewall"]
    assert {row["node"] for row in rows} == {n.node_name for n in cluster.nodes}, rows
    for row in rows:
        assert row["status"] == "PASS", row
        assert "refused" in row["detail"], row
    spans = [span.text for span in protected_ports(cluster)]
    assert str(cluster.ports.master) in spans
