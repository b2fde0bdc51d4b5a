"""The firewall: chains of vcluster's own that let only the cluster's nodes reach its ports.

Pure: which ports need it, what the chains hold, the `iptables-restore` transaction that makes
a host's filter table hold them (and nothing else of it changes), the probe that reads a host's
state (argv + parse) and the verdicts of the `firewall` check. The effects, over SSH, are in
cluster/steps/firewall.py; docs/firewall.md explains the design.

Two chains per host, each reached by one jump from INPUT:

- `VCLUSTER-<cluster>`: loopback and the cluster's node addresses RETURN (the rest of INPUT
  decides for them); the ports the inventory gives the cluster that have no authentication of
  their own are refused to everyone else.
- `VCLUSTER-EPHEMERAL`: the kernel's ephemeral port range, where vLLM's internal (ZMQ), NCCL's
  and gloo's listening sockets land, refused to everyone who is not a node of a vcluster
  cluster on this host. Shared by the clusters on a host, rebuilt from their chains each time
  one of them changes, so two clusters that share a host never lock each other out.

Refusals are TCP resets to new connections only (SYN without ACK), so a refused client learns
at once, and replies to the host's own outgoing connections are never matched.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cluster.decide.checks.result import CheckResult, Status
from cluster.decide.inventory import Inventory
from cluster.errors import VclusterError
from cluster.facts.probe import ProbeOutput, split_sections
from cluster.facts.ray import RAY_FIXED_METRICS_PORTS
from cluster.remote.supervisor import TCP_LISTEN, parse_tcp_table

CHAIN_PREFIX = "VCLUSTER-"
EPHEMERAL_CHAIN = "VCLUSTER-EPHEMERAL"
"""Upper case after the prefix: a cluster's name is lower case, so no cluster's chain is it."""
CHAIN_NAME_MAX = 28
"""iptables' limit on a chain's name (XT_EXTENSION_MAXNAMELEN less the final NUL)."""
LOCK_WAIT_S = 10
"""How long iptables waits for another program holding the xtables lock."""
RAY_CLIENT_PORT = 10001
RAY_DASHBOARD_PORT = 8265
CHECK_NAME = "firewall"
DOCS = "docs/firewall.md"

Rule = tuple[str, ...]
"""One rule as `iptables -S` prints it after `-A CHAIN`, in words."""
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FirewallError(VclusterError):
    """The firewall cannot be read or changed on a host."""


class IpVersion(enum.IntEnum):
    V4 = 4
    V6 = 6

    @property
    def tool(self) -> str:
        return "iptables" if self is IpVersion.V4 else "ip6tables"

    @property
    def label(self) -> str:
        return f"IPv{self.value}"

    @property
    def section(self) -> str:
        """The probe's section of this version's filter table (marker names have no digits)."""
        return "filter-four" if self is IpVersion.V4 else "filter-six"

    @property
    def host_prefix(self) -> int:
        return 32 if self is IpVersion.V4 else 128


@dataclass(frozen=True)
class PortSpan:
    """One port or a range of them, and what listens there."""

    first: int
    last: int
    what: str

    @property
    def text(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @property
    def argument(self) -> str:
        """As iptables' `--dport` takes it."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last


def chain_name(cluster: str) -> str:
    """The cluster's own chain: `VCLUSTER-<cluster>`, or with a digest where that is too long."""
    name = CHAIN_PREFIX + cluster
    if len(name) <= CHAIN_NAME_MAX:
        return name
    digest = hashlib.sha256(cluster.encode()).hexdigest()[:8]
    return f"{CHAIN_PREFIX}{cluster[: CHAIN_NAME_MAX - len(CHAIN_PREFIX) - 9]}-{digest}"


def protected_ports(inventory: Inventory) -> tuple[PortSpan, ...]:
    """The cluster's fixed ports that have no authentication of their own (or need none from
    outside): only its nodes reach them."""
    ports = inventory.ports
    count = len(inventory.model_list)
    spans = [
        PortSpan(ports.master, ports.master, "vLLM's rendezvous (torch store)"),
        PortSpan(ports.collective, ports.collective, "the collective check's rendezvous"),
        PortSpan(ports.agent, ports.agent, "the model agents"),
        PortSpan(ports.ray_metrics, ports.ray_metrics, "Ray's metrics"),
        PortSpan(ports.models, ports.models + 2 * count - 1, "the models' servers and rendezvous"),
        *(PortSpan(port, port, "Ray's metrics") for port in RAY_FIXED_METRICS_PORTS),
    ]
    return tuple(sorted(spans, key=lambda span: span.first))


def open_ports(inventory: Inventory, ssh_port: int) -> tuple[PortSpan, ...]:
    """Ports that stay open to everyone, also inside the ephemeral range: the users' endpoint,
    SSH, and Ray's ports that require the cluster's token."""
    spans = {
        inventory.ports.vllm: "the endpoint",
        ssh_port: "SSH",
        inventory.ports.ray: "Ray's GCS (token)",
        RAY_CLIENT_PORT: "Ray's client server (token)",
        RAY_DASHBOARD_PORT: "Ray's dashboard (token)",
    }
    return tuple(PortSpan(port, port, what) for port, what in sorted(spans.items()))


def _return_from(address: IpAddress) -> Rule:
    return ("-s", f"{address}/{address.max_prefixlen}", "-j", "RETURN")


def _return_to(span: PortSpan) -> Rule:
    return ("-p", "tcp", "-m", "tcp", "--dport", span.argument, "-j", "RETURN")


def _refuse(span: PortSpan) -> Rule:
    # `--syn` as iptables prints it back: new connections only, answered with a reset
    return (
        *("-p", "tcp", "-m", "tcp", "--dport", span.argument),
        *("--tcp-flags", "FIN,SYN,RST,ACK", "SYN"),
        *("-j", "REJECT", "--reject-with", "tcp-reset"),
    )


LOOPBACK: Rule = ("-i", "lo", "-j", "RETURN")


def cluster_chain(
    inventory: Inventory, version: IpVersion, addresses: Iterable[IpAddress], ssh_port: int
) -> list[Rule]:
    """The rules of `VCLUSTER-<cluster>` for one IP version, on a node whose sshd listens on
    `ssh_port`: loopback and the nodes pass on, the open ports are listed (the ephemeral
    chain reads them), the protected ports refuse everyone else."""
    mine = sorted(a for a in addresses if a.version == version.value)
    return [
        LOOPBACK,
        *(_return_from(address) for address in mine),
        *(_return_to(span) for span in open_ports(inventory, ssh_port)),
        *(_refuse(span) for span in protected_ports(inventory)),
    ]


def _is_node_rule(rule: Rule) -> bool:
    return len(rule) == 4 and rule[0] == "-s" and rule[2:] == ("-j", "RETURN")


def _is_open_port_rule(rule: Rule) -> bool:
    return (
        len(rule) == 8
        and rule[:5] == ("-p", "tcp", "-m", "tcp", "--dport")
        and (rule[6:] == ("-j", "RETURN"))
    )


def ephemeral_chain(
    cluster_chains: Mapping[str, Sequence[Rule]], ephemeral: PortSpan
) -> list[Rule]:
    """The rules of `VCLUSTER-EPHEMERAL` from every cluster chain on the host: loopback, each
    cluster's nodes and open ports pass on; the rest of the ephemeral range refuses."""
    nodes = {rule for rules in cluster_chains.values() for rule in rules if _is_node_rule(rule)}
    opened = {
        rule for rules in cluster_chains.values() for rule in rules if _is_open_port_rule(rule)
    }
    return [
        LOOPBACK,
        *sorted(nodes, key=lambda rule: ipaddress.ip_network(rule[1])),
        *sorted(opened, key=lambda rule: int(rule[5].split(":")[0])),
        _refuse(ephemeral),
    ]


@dataclass(frozen=True)
class FilterTable:
    """The filter table of one IP version, as `iptables -S` printed it."""

    chains: Mapping[str, tuple[Rule, ...]]

    def rules(self, chain: str) -> tuple[Rule, ...] | None:
        """The chain's rules; None when there is no such chain."""
        return self.chains.get(chain)

    def jumps_to(self, chain: str) -> int:
        """How many rules of INPUT jump to `chain` and do nothing else."""
        return sum(1 for rule in self.chains.get("INPUT", ()) if rule == ("-j", chain))

    def cluster_chains(self) -> dict[str, tuple[Rule, ...]]:
        """vcluster's per-cluster chains on this host (of every cluster, not only one)."""
        return {
            name: rules
            for name, rules in self.chains.items()
            if name.startswith(CHAIN_PREFIX) and name != EPHEMERAL_CHAIN
        }


def parse_filter_table(text: str) -> FilterTable:
    """`iptables -S` output (every chain of the filter table) as rules by chain."""
    chains: dict[str, list[Rule]] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) >= 2 and words[0] in ("-P", "-N"):
            chains.setdefault(words[1], [])
        elif len(words) >= 2 and words[0] == "-A":
            chains.setdefault(words[1], []).append(tuple(words[2:]))
    return FilterTable({name: tuple(rules) for name, rules in chains.items()})


Wanted = Mapping[str, Sequence[Rule] | None]
"""Chains and the rules each must hold, or None for a chain that must not exist."""


def wanted_chains(
    table: FilterTable, chain: str, rules: Sequence[Rule] | None, ephemeral: PortSpan
) -> dict[str, Sequence[Rule] | None]:
    """What one host's table of one version must hold for the cluster's chain to be `rules`
    (None: removed): that chain, and the ephemeral chain rebuilt from every cluster chain
    there will be (none left: the ephemeral chain goes too)."""
    others = {name: r for name, r in table.cluster_chains().items() if name != chain}
    everyone = others | ({chain: rules} if rules is not None else {})
    return {
        chain: rules,
        EPHEMERAL_CHAIN: ephemeral_chain(everyone, ephemeral) if everyone else None,
    }


def transaction(table: FilterTable, wanted: Wanted) -> str | None:
    """The `iptables-restore --noflush` input that makes `table` hold `wanted` (each chain
    with exactly one jump from INPUT, at its top), changing no other rule; None when it
    already does. Applied as one transaction: there is no moment without the rules."""
    filled: list[str] = []
    jumps: list[str] = []
    removed: list[str] = []
    for chain, rules in wanted.items():
        present = table.rules(chain)
        count = table.jumps_to(chain)
        if rules is None:
            removed += [f"-D INPUT -j {chain}"] * count
            removed += [f"-F {chain}", f"-X {chain}"] if present is not None else []
            continue
        if present != tuple(rules):
            # declaring a chain creates it, or (with --noflush) empties it
            filled += [f":{chain} - [0:0]", *(shlex.join(("-A", chain, *rule)) for rule in rules)]
        jumps += (
            [f"-I INPUT 1 -j {chain}"] if count == 0 else [f"-D INPUT -j {chain}"] * (count - 1)
        )
    body = filled + jumps + removed
    return "\n".join(["*filter", *body, "COMMIT", ""]) if body else None


# One POSIX sh script per host: the ephemeral range, the addresses, what listens, and each
# filter table read as root (or through `sudo -n`). Sections as the host probe's
# (cluster/facts/probe.py), so the same splitter reads them.
_PROBE_SCRIPT = r"""
export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"
wait=$1
err=$(mktemp 2>/dev/null) || err=/tmp/vcluster-firewall.$$
trap 'rm -f "$err"' EXIT
if [ "$(id -u)" = 0 ]; then as_root() { "$@"; }; else as_root() { sudo -n "$@"; }; fi
section() {
  name=$1
  shift
  out=$("$@" 2>"$err")
  rc=$?
  echo "@@vcluster $name rc=$rc@@"
  [ -n "$out" ] && printf '%s\n' "$out"
  [ -s "$err" ] && echo "@@vcluster $name stderr@@" && cat "$err"
}
section port-range cat /proc/sys/net/ipv4/ip_local_port_range
section addresses ip -o addr show
section tcp-four cat /proc/net/tcp
section tcp-six cat /proc/net/tcp6
for tool in iptables ip6tables; do
  if [ "$tool" = iptables ]; then name=filter-four; else name=filter-six; fi
  if command -v "$tool" >/dev/null 2>&1; then
    section "$name" as_root "$tool" -w "$wait" -S
  else
    echo "@@vcluster $name missing $tool@@"
  fi
done
echo "@@vcluster end@@"
"""

_APPLY_SCRIPT = r"""
export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"
wait=$1
if [ "$(id -u)" = 0 ]; then as_root() { "$@"; }; else as_root() { sudo -n "$@"; }; fi
status=0
if [ -n "$2" ]; then printf '%s' "$2" | as_root iptables-restore -w "$wait" --noflush || status=$?; fi
if [ -n "$3" ]; then printf '%s' "$3" | as_root ip6tables-restore -w "$wait" --noflush || status=$?; fi
exit $status
"""


def probe_argv() -> list[str]:
    """The one command that reads a host's firewall state; parse with `parse_probe`."""
    return ["sh", "-c", _PROBE_SCRIPT, "vcluster-firewall", str(LOCK_WAIT_S)]


def apply_argv(transactions: Mapping[IpVersion, str]) -> list[str]:
    """The one command that applies a host's transactions (`iptables-restore`, then
    `ip6tables-restore`), each passed as an argument, never pasted into the script."""
    return [
        "sh",
        "-c",
        _APPLY_SCRIPT,
        "vcluster-firewall",
        str(LOCK_WAIT_S),
        transactions.get(IpVersion.V4, ""),
        transactions.get(IpVersion.V6, ""),
    ]


@dataclass(frozen=True)
class InterfaceAddress:
    interface: str
    address: IpAddress
    scope: str


@dataclass(frozen=True)
class HostFirewall:
    """What the probe found on one host."""

    ephemeral: PortSpan | None
    """The kernel's ephemeral port range (net.ipv4.ip_local_port_range, IPv6 too)."""
    addresses: tuple[InterfaceAddress, ...]
    listening: tuple[tuple[str, int], ...]
    """(address, port) of every listening TCP socket of the host."""
    tables: Mapping[IpVersion, FilterTable]
    unreadable: Mapping[IpVersion, str] = field(default_factory=dict)
    """Why a version's filter table could not be read: its tool missing, or its error."""

    @property
    def uses_ipv6(self) -> bool:
        """An IPv6 address on an interface other than loopback: IPv6 reaches the host."""
        return any(a.address.version == 6 and a.interface != "lo" for a in self.addresses)


def parse_probe(output: str) -> HostFirewall:
    """The probe's output as a `HostFirewall`; raise when the output is cut off."""
    probe = split_sections(output)
    if not probe.complete:
        raise FirewallError("the firewall probe's output was cut off", fix="run the command again")
    tables: dict[IpVersion, FilterTable] = {}
    unreadable: dict[IpVersion, str] = {}
    for version in IpVersion:
        section = probe.get(version.section)
        if section is not None and section.ok:
            tables[version] = parse_filter_table(section.stdout)
        else:
            unreadable[version] = section.message() if section is not None else "not probed"
    return HostFirewall(
        ephemeral=_port_range(probe),
        addresses=parse_addresses(_text(probe, "addresses")),
        listening=tuple(
            sorted(
                {
                    (address, port)
                    for name in ("tcp-four", "tcp-six")
                    for address, port, _, _, state, _ in parse_tcp_table(_text(probe, name))
                    if state == TCP_LISTEN
                },
                key=lambda entry: (entry[1], entry[0]),
            )
        ),
        tables=tables,
        unreadable=unreadable,
    )


def _text(probe: ProbeOutput, name: str) -> str:
    section = probe.get(name)
    return section.stdout if section is not None and section.ok else ""


def _port_range(probe: ProbeOutput) -> PortSpan | None:
    words = _text(probe, "port-range").split()
    if len(words) != 2 or not all(word.isdigit() for word in words):
        return None
    return PortSpan(int(words[0]), int(words[1]), "the kernel's ephemeral ports")


def parse_addresses(text: str) -> tuple[InterfaceAddress, ...]:
    """`ip -o addr show` as (interface, address, scope) of each address."""
    found = []
    for line in text.splitlines():
        cells = line.split()
        if len(cells) < 4 or cells[2] not in ("inet", "inet6"):
            continue
        scope = cells[cells.index("scope") + 1] if "scope" in cells[:-1] else "global"
        address = ipaddress.ip_interface(cells[3]).ip
        found.append(InterfaceAddress(cells[1].split("@", 1)[0], address, scope))
    return tuple(found)


def node_addresses(
    host: HostFirewall, interface: str | None, known: Iterable[str | None]
) -> set[IpAddress]:
    """A node's addresses as other nodes see them: the global addresses of the interface the
    cluster uses (the one that routes to the head, or `network.interface`), and the
    addresses already `known` (the inventory's, the route's source) that are IP addresses."""
    found: set[IpAddress] = {
        a.address for a in host.addresses if a.interface == interface and a.scope == "global"
    }
    for text in known:
        if text is None:
            continue
        try:
            found.add(ipaddress.ip_address(text))
        except ValueError:  # a host name: its addresses are on the interface
            continue
    return {a for a in found if not a.is_loopback}


HostPlan = Mapping[IpVersion, Mapping[str, Sequence[Rule] | None]]
"""For each IP version whose table matters: the chains it must hold (None: not at all)."""


def host_plan(
    inventory: Inventory,
    host: HostFirewall,
    addresses: Iterable[IpAddress],
    ssh_port: int,
    *,
    node: str,
    user: str = "the SSH user",
    remove: bool = False,
) -> HostPlan:
    """What each readable filter table of one host must hold: the cluster's chain (or none,
    with `remove`) and the ephemeral chain. Raise when a table that matters is unreadable:
    IPv4's always, IPv6's where the host has IPv6 addresses (a removal skips what it cannot
    read: nothing of vcluster's can be there)."""
    chain = chain_name(inventory.cluster)
    if host.ephemeral is None:
        raise FirewallError(
            "could not read the ephemeral port range (/proc/sys/net/ipv4/ip_local_port_range)",
            where=node,
            fix=f"check that the host is Linux with /proc mounted; or set network.firewall: false ({DOCS})",
        )
    addresses = list(addresses)
    plan: dict[IpVersion, Mapping[str, Sequence[Rule] | None]] = {}
    for version in IpVersion:
        table = host.tables.get(version)
        if table is None:
            if not remove and (version is IpVersion.V4 or host.uses_ipv6):
                raise unreadable_error(version, host.unreadable.get(version, ""), node, user)
            continue
        rules = None if remove else cluster_chain(inventory, version, addresses, ssh_port)
        plan[version] = wanted_chains(table, chain, rules, host.ephemeral)
    return plan


def unreadable_error(
    version: IpVersion, why: str, node: str, user: str = "the SSH user"
) -> FirewallError:
    """The one-line error for a filter table vcluster cannot read (or change) as root."""
    tools = "iptables, iptables-restore, ip6tables and ip6tables-restore"
    if "missing" in why or "not installed" in why:
        fix = f"install {version.tool} (Debian: apt-get install iptables), or set network.firewall: false"
    else:
        fix = (
            f"connect as root, or let {user} run {tools} through `sudo -n` (passwordless); "
            "or set network.firewall: false"
        )
    return FirewallError(
        f"cannot read the {version.label} firewall as root ({version.tool}: {why})",
        where=node,
        fix=f"{fix} ({DOCS})",
    )


def host_transactions(host: HostFirewall, plan: HostPlan) -> dict[IpVersion, str]:
    """Each version's transaction; a version whose table already matches is left out."""
    found = {}
    for version, wanted in plan.items():
        text = transaction(host.tables[version], wanted)
        if text is not None:
            found[version] = text
    return found


Outcome = Literal["refused", "connected", "no answer", "unreachable"]


@dataclass(frozen=True)
class Attempt:
    """A TCP connection tried from the controller to a node's port."""

    port: int
    outcome: Outcome
    local_address: str | None = None
    """This machine's address on the connection, when it was made."""
    detail: str = ""


def ports_to_try(
    inventory: Inventory,
    host: HostFirewall,
    target: str | None,
    ssh_port: int,
    ephemeral_tries: int = 2,
) -> list[int]:
    """Protected ports that listen where a connection to `target` (an IP address) arrives: the
    cluster's own first, then a few of the ephemeral range (a closed port refuses anyway, so
    only a listening one tells the firewall's doing)."""

    def reachable(address: str) -> bool:
        return address in ("0.0.0.0", "::") or address == target  # noqa: S104

    listening = sorted({port for address, port in host.listening if reachable(address)})
    opened = open_ports(inventory, ssh_port)
    own = [p for p in listening if any(p in span for span in protected_ports(inventory))]
    ephemeral = [
        p
        for p in listening
        if host.ephemeral is not None
        and p in host.ephemeral
        and p not in own
        and not any(p in span for span in opened)
    ]
    return own + ephemeral[:ephemeral_tries]


def check_node(
    inventory: Inventory,
    node: str,
    host: HostFirewall,
    plan: HostPlan,
    *,
    running: bool,
    attempts: Sequence[Attempt],
    node_addresses: set[IpAddress],
    untried: str | None = None,
) -> CheckResult:
    """The `firewall` verdict on one node, with `network.firewall: true`: the chains hold what
    `up` installs, and the protected ports that listen refuse this machine."""
    chain = chain_name(inventory.cluster)
    versions = ", ".join(version.label for version in plan) or "none"
    if not running and all(host.tables[version].rules(chain) is None for version in plan):
        detail = f"not installed yet ({versions} readable as root): `vcluster up` installs {chain}"
        return CheckResult(CHECK_NAME, Status.PASS, detail, node)
    drift = [
        problem
        for version, wanted in plan.items()
        for name, rules in wanted.items()
        if (problem := _drift(host.tables[version], name, rules)) is not None
    ]
    if drift:
        return CheckResult(
            CHECK_NAME,
            Status.FAIL,
            "not as `up` installs it: " + "; ".join(drift),
            node,
            "run `vcluster up` (it puts the chains back without stopping the cluster); if they "
            f"go again, something on the host rewrites INPUT (firewalld, ufw reloads): {DOCS}",
        )
    installed = f"{chain} installed ({versions})"
    reached = [a for a in attempts if a.outcome == "connected"]
    local = reached[0].local_address if reached else None
    if local is not None and ipaddress.ip_address(local) in node_addresses:
        detail = f"{installed}; not tried from outside: this machine is a node ({local})"
        return CheckResult(CHECK_NAME, Status.PASS, detail, node)
    if reached:
        ports = ", ".join(str(a.port) for a in reached)
        return CheckResult(
            CHECK_NAME,
            Status.FAIL,
            f"{installed}, but port(s) {ports} accepted a connection from this machine "
            f"({local}), which is not a node",
            node,
            f"look for what accepts it before vcluster's jump (`iptables -S INPUT`); {DOCS}",
        )
    refused = [
        f"{a.port}" + (" (no answer)" if a.outcome == "no answer" else "")
        for a in attempts
        if a.outcome in ("refused", "no answer")
    ]
    if refused:
        detail = f"{installed}; from this machine, refused: {', '.join(refused)}"
    elif untried is not None:
        detail = f"{installed}; not tried from here: {untried}"
    else:
        tried = "; ".join(f"{a.port}: {a.detail}" for a in attempts) or "nothing listens yet"
        detail = f"{installed}; not tried from here ({tried})"
    return CheckResult(CHECK_NAME, Status.PASS, detail, node)


def _drift(table: FilterTable, chain: str, rules: Sequence[Rule] | None) -> str | None:
    """How `chain` differs from what it should hold (`rules`; None: absent), or None."""
    present, jumps = table.rules(chain), table.jumps_to(chain)
    if rules is None:
        return f"{chain} is left over" if present is not None or jumps else None
    if present is None:
        return f"{chain} is missing"
    if tuple(rules) != present:
        return f"{chain} holds other rules than `up` installs"
    return None if jumps == 1 else f"INPUT jumps to {chain} {jumps} time(s), not once"


def check_disabled(
    inventory: Inventory, node: str, host: HostFirewall | None, ssh_port: int
) -> list[CheckResult]:
    """`network.firewall: false`: a WARN per protected port of the cluster's that listens open
    to the network, one for the ephemeral range's, one naming them all when none listens."""
    fix = (
        "set network.firewall: true (the default), or keep everything but the nodes away from "
        f"these ports yourself ({DOCS})"
    )
    opened = open_ports(inventory, ssh_port)
    exposed = sorted(
        {
            port
            for address, port in (host.listening if host is not None else ())
            if not ipaddress.ip_address(address).is_loopback
            and not any(port in span for span in opened)
        }
    )
    results = []
    for span in protected_ports(inventory):
        for port in (p for p in exposed if p in span):
            detail = f"port {port} ({span.what}) is open to any address: network.firewall is false"
            results.append(CheckResult(CHECK_NAME, Status.WARN, detail, node, fix))
    ephemeral = host.ephemeral if host is not None else None
    if ephemeral is not None:
        own = {p for span in protected_ports(inventory) for p in exposed if p in span}
        inside = [str(p) for p in exposed if p in ephemeral and p not in own]
        if inside:
            detail = (
                f"{len(inside)} port(s) of the ephemeral range {ephemeral.text} (vLLM's, NCCL's, "
                f"gloo's internal) are open to any address: {', '.join(inside)}"
            )
            results.append(CheckResult(CHECK_NAME, Status.WARN, detail, node, fix))
    if results:
        return results
    ranges = [span.text for span in protected_ports(inventory)]
    ranges.append(ephemeral.text if ephemeral is not None else "the ephemeral range")
    detail = (
        f"off (network.firewall: false): {', '.join(ranges)} will be open to any address "
        "while the cluster runs"
    )
    return [CheckResult(CHECK_NAME, Status.WARN, detail, node, fix)]
