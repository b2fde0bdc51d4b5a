"""The firewall each node gets (pure): install the cluster's chains, replace what differs, or
keep what matches, from the host's probe (cluster/decide/firewall.py builds the rules)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from cluster.decide.firewall import (
    HostFirewall,
    IpAddress,
    IpVersion,
    chain_name,
    host_plan,
    host_transactions,
    node_addresses,
)
from cluster.decide.inventory import Inventory
from cluster.facts.host import HostFacts


def cluster_addresses(
    inventory: Inventory,
    hosts: Mapping[str, HostFirewall],
    host_facts: Mapping[str, HostFacts],
) -> set[IpAddress]:
    """Every address the cluster's nodes reach each other from: the addresses of the
    interface each uses for the cluster, its route's source address, the inventory's."""
    found: set[IpAddress] = set()
    for node in inventory.nodes:
        name = node.node_name
        facts = host_facts.get(name)
        route = facts.route if facts is not None else None
        interface = inventory.network.interface or (route.interface if route else None)
        known = [node.address, route.source_address if route else None]
        host = hosts.get(name)
        if host is not None:
            found |= node_addresses(host, interface, known)
        else:  # not probed: what the inventory says
            found |= node_addresses(HostFirewall(None, (), (), {}), None, known)
    return found


@dataclass(frozen=True)
class HostAccess:
    """How this machine reaches a node: its SSH port (kept open), its label and user (for the
    errors' fix)."""

    port: int
    label: str
    user: str


class FirewallVerb(Enum):
    INSTALL = "install"
    REPLACE = "replace"
    KEEP = "keep"


@dataclass(frozen=True)
class FirewallAction:
    """One node's firewall change: the `iptables-restore` transaction per IP version (none
    when it is kept)."""

    node: str
    verb: FirewallVerb
    transactions: Mapping[IpVersion, str]


def decide_host_firewall(
    inventory: Inventory,
    node: str,
    host: HostFirewall,
    addresses: set[IpAddress],
    access: HostAccess,
) -> FirewallAction:
    """What to change on one host so that it holds the cluster's chains; raise (naming the
    node and the fix) when a table that matters cannot be read as root."""
    wanted = host_plan(inventory, host, addresses, access.port, node=access.label, user=access.user)
    transactions = host_transactions(host, wanted)
    if not transactions:
        return FirewallAction(node, FirewallVerb.KEEP, {})
    chain = chain_name(inventory.cluster)
    present = any(chain in table.chains for table in host.tables.values())
    verb = FirewallVerb.REPLACE if present else FirewallVerb.INSTALL
    return FirewallAction(node, verb, transactions)
