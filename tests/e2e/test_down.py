"""`vcluster down`: no container of the cluster left on any node, no rule of vcluster's left in
any node's firewall (read with `iptables -S` inside the node containers), and a second `down`
succeeds. On the stand-in vLLM: what `down` removes is vcluster's (the containers, the chains).

The tests run in file order: the first takes the cluster down.
"""

from __future__ import annotations

import pytest

from cluster.decide.firewall import chain_name
from cluster.decide.inventory import load_inventory
from cluster.nodes.session import Session
from tests.support.cli import vcluster
from tests.support.sandbox_nodes import on_node

pytestmark = [pytest.mark.e2e, pytest.mark.stage("down")]


def test_down_leaves_no_container(standin_cluster, sandbox_cluster):
    chain = chain_name(standin_cluster.cluster)
    for node in standin_cluster.nodes:  # the firewall is there before `down`
        assert f"-A INPUT -j {chain}" in on_node(standin_cluster, node, "iptables", "-S")
    down = vcluster("down", str(standin_cluster.source))
    sandbox_cluster.changed()
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Traceback" not in down.stderr
    with Session(standin_cluster) as session:
        session.open()
        for node in session.connections:
            listed = session.ssh(node).run(
                [
                    "docker",
                    "ps",
                    "-aq",
                    "--filter",
                    f"label=vcluster.cluster={standin_cluster.cluster}",
                ]
            )
            assert listed.stdout.strip() == "", node


def test_after_down_no_rule_of_vcluster_is_left_on_any_node(standin_inventory):
    cluster = load_inventory(standin_inventory)
    for node in cluster.nodes:
        for tool in ("iptables", "ip6tables"):
            rules = on_node(cluster, node, tool, "-S")
            assert "VCLUSTER" not in rules, (node.node_name, tool, rules)


def test_a_second_down_succeeds(standin_inventory):
    again = vcluster("down", str(standin_inventory))  # idempotent: nothing left to remove
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
