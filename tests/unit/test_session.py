"""How each node is reached: its own ssh settings over the inventory's defaults."""

from __future__ import annotations

from pathlib import Path

from cluster.decide.inventory import load_inventory
from cluster.nodes.session import ssh_target, ssh_timeouts

REPO = Path(__file__).resolve().parents[2]


def test_defaults_apply_to_every_node():
    inventory = load_inventory(REPO / "inventory" / "gpu-2x8.yaml")
    target = ssh_target(inventory, inventory.nodes[1])
    assert (target.name, target.host, target.port, target.user) == (
        "gpu-b",
        "10.0.0.12",
        22,
        "ubuntu",
    )
    assert target.key_file == Path("~/.ssh/id_ed25519").expanduser()
    assert target.known_hosts == Path("~/.ssh/known_hosts").expanduser()
    assert target.jump is None
    assert not target.trust_on_first_use


def test_a_node_override_wins_and_the_jump_host_is_kept():
    inventory = load_inventory(REPO / "inventory" / "gpu-4x8.yaml")
    overridden = ssh_target(inventory, inventory.nodes[3])
    assert overridden.port == 2222
    assert overridden.jump is not None
    assert (overridden.jump.host, overridden.jump.user) == ("bastion.example.internal", "ops")
    assert overridden.jump.known_hosts == Path("/etc/vcluster/known_hosts")


def test_timeouts_come_from_the_inventory():
    inventory = load_inventory(REPO / "inventory" / "gpu-4x8.yaml")
    assert ssh_timeouts(inventory).connect == 15
    assert ssh_timeouts(inventory).command == 120
