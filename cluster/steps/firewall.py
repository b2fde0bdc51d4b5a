"""The firewall on every node, over SSH: installed by `up`, removed by `down`, read by `check`.

One probe per host reads its state (the ephemeral port range, its addresses, what listens,
each filter table as root); the rules are decided from it (cluster/decide/firewall.py and, for `up`,
cluster/decide/up/firewall.py: install, replace or keep; pure); one `iptables-restore`
transaction per IP version changes what differs, or nothing. The design,
and what it means for other software on the hosts: docs/firewall.md.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from cluster.decide.checks import CheckResult, Status
from cluster.decide.firewall import (
    CHECK_NAME,
    DOCS,
    Attempt,
    FirewallError,
    HostFirewall,
    HostPlan,
    IpVersion,
    apply_argv,
    chain_name,
    check_disabled,
    check_node,
    host_plan,
    host_transactions,
    parse_probe,
    ports_to_try,
    probe_argv,
    protected_ports,
    unreadable_error,
)
from cluster.decide.inventory import Inventory
from cluster.decide.plan import container_name
from cluster.decide.up.firewall import (
    FirewallAction,
    FirewallVerb,
    HostAccess,
    cluster_addresses,
    decide_host_firewall,
)
from cluster.errors import VclusterError
from cluster.facts.host import HostFacts
from cluster.nodes.containers import inspect_container
from cluster.nodes.session import Session
from cluster.steps.context import UpContext

CONNECT_TIMEOUT_S = 3.0
"""How long `check` waits for a node's protected port to answer this machine (a refusal
comes back at once; silence means something on the way drops it)."""


def read_host(session: Session, node: str) -> HostFirewall:
    """The host's firewall state, from one probe over its SSH connection."""
    return parse_probe(session.ssh(node).run(probe_argv()).stdout)


def _ssh_port(session: Session, node: str) -> int:
    return session.ssh(node).target.port


def _apply(session: Session, node: str, host: HostFirewall, plan: HostPlan) -> bool:
    """Apply what differs on one host; True when something changed."""
    transactions = host_transactions(host, plan)
    if not transactions:
        return False
    _restore(session, node, transactions)
    return True


def _restore(session: Session, node: str, transactions: Mapping[IpVersion, str]) -> None:
    """One `iptables-restore` transaction per IP version on the node."""
    connection = session.ssh(node)
    result = connection.run(apply_argv(dict(transactions)))
    if not result.ok:
        raise FirewallError(
            f"iptables-restore failed (exit {result.exit_code}): {restore_message(result.stderr)}",
            where=connection.target.label,
            fix="run `vcluster up` again (another program may have changed the rules at the "
            f"same moment); if it persists, see {DOCS}",
        )


def restore_message(stderr: str) -> str:
    """iptables-restore's message on one line, without its usage hint and warnings."""
    lines = [line.strip() for line in stderr.splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Try `", "# Warning"))]
    return " ".join(kept)[:300] or "no output"


def install_firewall(context: UpContext) -> str:
    """Step of `up`: the cluster's chains on every node (removed with `network.firewall:
    false`), before any of its ports opens."""
    inventory, session = context.inventory, context.session
    if not inventory.network.firewall:
        left = _remove_everywhere(inventory, session, strict=False)
        return "off (network.firewall: false)" + (f"; {left}" if left else "")
    probed = session.on_each(lambda node: read_host(session, node))
    probed.raise_if_failed("reading the firewall")
    hosts = probed.succeeded
    addresses = cluster_addresses(inventory, hosts, context.host_facts)

    def install(node: str) -> FirewallAction:
        target = session.ssh(node).target
        access = HostAccess(target.port, target.label, target.user)
        action = decide_host_firewall(inventory, node, hosts[node], addresses, access)
        if action.verb is not FirewallVerb.KEEP:
            _restore(session, node, action.transactions)
        return action

    outcome = session.on_each(install)
    outcome.raise_if_failed("installing the firewall")
    changed = [
        node for node, action in outcome.succeeded.items() if action.verb is not FirewallVerb.KEEP
    ]
    if changed:
        context.changes.append(f"firewall on {', '.join(changed)}")
    versions = sorted({v.label for h in hosts.values() for v in h.tables}, reverse=False)
    ranges = sorted({h.ephemeral.text for h in hosts.values() if h.ephemeral is not None})
    ports = ", ".join(span.text for span in protected_ports(inventory))
    state = f"installed on {', '.join(changed)}" if changed else "unchanged"
    return (
        f"{chain_name(inventory.cluster)} {state} ({', '.join(versions)}); from "
        f"{len(addresses)} node address(es) only: {ports} and {', '.join(ranges)}"
    )


def remove_firewall(inventory: Inventory, session: Session) -> str:
    """Step of `down`: the cluster's chain off every connected node, whatever runs there."""
    removed = _remove_everywhere(inventory, session, strict=inventory.network.firewall)
    return removed or f"no {chain_name(inventory.cluster)} on any node"


def _remove_everywhere(inventory: Inventory, session: Session, *, strict: bool) -> str:
    """Remove the cluster's chain (and the ephemeral chain when no cluster chain is left) from
    every connected node. `strict`: a node whose firewall cannot be read as root fails (else
    it is skipped: without root nothing was installed there). Says where it removed one."""
    chain = chain_name(inventory.cluster)

    def remove(node: str) -> bool:
        host = read_host(session, node)
        if IpVersion.V4 not in host.tables:
            if strict:
                why = host.unreadable.get(IpVersion.V4, "")
                target = session.ssh(node).target
                raise unreadable_error(IpVersion.V4, why, target.label, target.user)
            return False
        if not any(chain in table.chains for table in host.tables.values()):
            return False
        plan = host_plan(inventory, host, (), _ssh_port(session, node), node=node, remove=True)
        return _apply(session, node, host, plan)

    outcome = session.on_each(remove)
    outcome.raise_if_failed("removing the firewall")
    removed = [node for node, did in outcome.succeeded.items() if did]
    return f"{chain} removed from {', '.join(removed)}" if removed else ""


def firewall_results(
    inventory: Inventory, session: Session, host_facts: Mapping[str, HostFacts]
) -> list[CheckResult]:
    """The `firewall` check on every connected node: with `network.firewall: true`, the
    chains as `up` installs them and the protected ports refusing this machine; else a WARN
    per port left open."""
    nodes = list(session.connections)
    probed = session.on_each(lambda node: read_host(session, node), nodes)
    hosts = probed.succeeded
    if not inventory.network.firewall:
        return [
            result
            for node in nodes
            for result in check_disabled(inventory, node, hosts.get(node), _ssh_port(session, node))
        ]
    addresses = cluster_addresses(inventory, hosts, host_facts)
    name, chain = container_name(inventory.cluster), chain_name(inventory.cluster)

    def verdict(node: str) -> CheckResult:
        host = hosts[node]
        target = session.ssh(node).target
        try:
            plan = host_plan(inventory, host, addresses, target.port, node=node, user=target.user)
        except FirewallError as error:
            return CheckResult(CHECK_NAME, Status.FAIL, error.message, node, error.fix)
        attempts, untried = _attempts(inventory, session, node, host)
        return check_node(
            inventory,
            node,
            host,
            plan,
            running=_absent(host, chain) and _running(session, node, name),
            attempts=attempts,
            untried=untried,
            node_addresses=addresses,
        )

    outcome = session.on_each(verdict, list(hosts))
    results = list(outcome.succeeded.values())
    failed = {**probed.failed, **outcome.failed}
    results += [_failed(node, error) for node, error in failed.items()]
    order = {node.node_name: index for index, node in enumerate(inventory.nodes)}
    return sorted(results, key=lambda result: order.get(result.node or "", len(order)))


def _absent(host: HostFirewall, chain: str) -> bool:
    return all(chain not in table.chains for table in host.tables.values())


def _running(session: Session, node: str, name: str) -> bool:
    """Whether the cluster's container runs on the node (asked only where its chain is
    missing: before `up` that is expected, while the cluster runs it is not)."""
    state = inspect_container(session.docker(node), name)
    return state is not None and state.running


def _failed(node: str, error: VclusterError) -> CheckResult:
    return CheckResult(
        CHECK_NAME, Status.FAIL, f"could not read it: {error.message}", node, error.fix
    )


def _attempts(
    inventory: Inventory, session: Session, node: str, host: HostFirewall
) -> tuple[list[Attempt], str | None]:
    """Connections from this machine to the node's protected ports that listen; or why none
    can tell (the node only reachable through a jump host, its name unresolved)."""
    target = session.ssh(node).target
    if target.jump is not None:
        return [], "this machine reaches it only through its jump host"
    try:
        address = socket.getaddrinfo(target.host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        return [], f"{target.host} does not resolve here ({exc})"
    ports = ports_to_try(inventory, host, str(address), target.port)
    return [_attempt(str(address), port) for port in ports], None


def _attempt(address: str, port: int) -> Attempt:
    try:
        with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S) as connection:
            return Attempt(port, "connected", str(connection.getsockname()[0]))
    except ConnectionRefusedError:
        return Attempt(port, "refused")
    except TimeoutError:
        return Attempt(port, "no answer")
    except OSError as exc:
        return Attempt(port, "unreachable", detail=str(exc))
