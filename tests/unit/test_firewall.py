"""The firewall's rules, the transaction that installs them, the probe's parser and the
`firewall` check's verdicts (docs/firewall.md). Parsers read real captures
(tests/fixtures/firewall, see its README)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest
import yaml

from cluster.decide.checks import Status
from cluster.decide.firewall import (
    CHAIN_NAME_MAX,
    EPHEMERAL_CHAIN,
    LOOPBACK,
    Attempt,
    FilterTable,
    FirewallError,
    HostFirewall,
    InterfaceAddress,
    IpVersion,
    PortSpan,
    chain_name,
    check_disabled,
    check_node,
    cluster_chain,
    ephemeral_chain,
    host_plan,
    host_transactions,
    node_addresses,
    open_ports,
    parse_addresses,
    parse_filter_table,
    parse_probe,
    ports_to_try,
    protected_ports,
    transaction,
    wanted_chains,
)
from cluster.decide.inventory import Inventory, load_inventory
from cluster.steps.firewall import restore_message

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "firewall"
EPHEMERAL = PortSpan(32768, 60999, "the kernel's ephemeral ports")
HEAD, WORKER, IPV6_NODE = (ipaddress.ip_address(a) for a in ("10.0.0.1", "10.0.0.2", "fd00::3"))


def inventory(tmp_path: Path, **changes: object) -> Inventory:
    """The sandbox's inventory (inventory/cpu-2.yaml: one model, executor mp), changed."""
    document = yaml.safe_load((REPO / "inventory" / "cpu-2.yaml").read_text())
    document.update(changes)
    if "models" in changes:
        del document["model"]
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_inventory(path)


def gpu_ray() -> Inventory:
    """Two GPU nodes, one model over Ray (inventory/gpu-2x8.yaml)."""
    return load_inventory(REPO / "inventory" / "gpu-2x8.yaml")


def capture(name: str) -> HostFirewall:
    return parse_probe((FIXTURES / name).read_text())


def refuse(ports: str) -> tuple[str, ...]:
    return ("-p", "tcp", "-m", "tcp", "--dport", ports, "--tcp-flags", "FIN,SYN,RST,ACK",
            "SYN", "-j", "REJECT", "--reject-with", "tcp-reset")  # fmt: skip


def open_to(port: str) -> tuple[str, ...]:
    return ("-p", "tcp", "-m", "tcp", "--dport", port, "-j", "RETURN")


# -- which ports ------------------------------------------------------------------------------


def test_the_chain_is_named_after_the_cluster_within_iptables_limit():
    assert chain_name("cpu-demo") == "VCLUSTER-cpu-demo"
    long = chain_name("a-very-long-cluster-name-for-production")
    assert len(long) == CHAIN_NAME_MAX and long.startswith("VCLUSTER-a-very-lon")
    assert long != chain_name("a-very-long-cluster-name-for-production-2")
    assert chain_name("ephemeral") != EPHEMERAL_CHAIN  # cluster names are lower case


def test_one_model_protects_the_rendezvous_agent_collective_metrics_and_model_ports(tmp_path):
    spans = {(s.text, s.what) for s in protected_ports(inventory(tmp_path))}
    assert spans == {
        ("8080", "Ray's metrics"),
        ("29501", "vLLM's rendezvous (torch store)"),
        ("29512", "the collective check's rendezvous"),
        ("29513", "the model agents"),
        ("30100-30101", "the models' servers and rendezvous"),
        ("44217", "Ray's metrics"),
        ("44227", "Ray's metrics"),
    }


def test_several_models_protect_two_ports_each(tmp_path):
    models = [{"name": f"/data/hf/models/m{i}", "served_name": f"m{i}"} for i in range(3)]
    spans = [s.text for s in protected_ports(inventory(tmp_path, models=models))]
    assert "30100-30105" in spans


def test_the_inventorys_ports_are_the_ones_protected(tmp_path):
    ports = {"master": 21000, "models": 40000, "ray_metrics": 9090}
    spans = [s.text for s in protected_ports(inventory(tmp_path, ports=ports))]
    assert {"21000", "40000-40001", "9090"} <= set(spans) and "29501" not in spans


def test_the_endpoint_ssh_and_rays_token_ports_stay_open(tmp_path):
    spans = {(s.text, s.what) for s in open_ports(inventory(tmp_path), ssh_port=2222)}
    assert spans == {
        ("8000", "the endpoint"),
        ("2222", "SSH"),
        ("6379", "Ray's GCS (token)"),
        ("10001", "Ray's client server (token)"),
        ("8265", "Ray's dashboard (token)"),
    }


# -- what the chains hold ---------------------------------------------------------------------


def test_the_cluster_chain_lets_loopback_and_nodes_on_then_refuses_new_connections(tmp_path):
    rules = cluster_chain(inventory(tmp_path), IpVersion.V4, [WORKER, HEAD, IPV6_NODE], 22)
    assert rules == [
        ("-i", "lo", "-j", "RETURN"),
        ("-s", "10.0.0.1/32", "-j", "RETURN"),
        ("-s", "10.0.0.2/32", "-j", "RETURN"),
        open_to("22"), open_to("6379"), open_to("8000"), open_to("8265"), open_to("10001"),
        refuse("8080"), refuse("29501"), refuse("29512"), refuse("29513"), refuse("30100:30101"),
        refuse("44217"), refuse("44227"),
    ]  # fmt: skip


def test_the_ipv6_chain_names_only_ipv6_nodes(tmp_path):
    rules = cluster_chain(inventory(tmp_path), IpVersion.V6, [HEAD, WORKER, IPV6_NODE], 22)
    assert [r for r in rules if r[0] == "-s"] == [("-s", "fd00::3/128", "-j", "RETURN")]
    assert rules[0] == LOOPBACK and refuse("29501") in rules


def test_a_ray_cluster_protects_rays_metrics_and_keeps_its_token_ports_open(tmp_path):
    rules = cluster_chain(gpu_ray(), IpVersion.V4, [HEAD, WORKER], 22)
    assert refuse("8080") in rules and refuse("44217") in rules
    assert open_to("6379") in rules and open_to("10001") in rules


def test_the_ephemeral_chain_lets_every_clusters_nodes_and_open_ports_on(tmp_path):
    first = cluster_chain(inventory(tmp_path), IpVersion.V4, [HEAD, WORKER], 22)
    other = cluster_chain(
        inventory(tmp_path, cluster="other", ports={"vllm": 45000}),
        IpVersion.V4,
        [WORKER, ipaddress.ip_address("10.0.0.9")],
        22,
    )
    rules = ephemeral_chain({"VCLUSTER-cpu-demo": first, "VCLUSTER-other": other}, EPHEMERAL)
    assert rules == [
        LOOPBACK,
        ("-s", "10.0.0.1/32", "-j", "RETURN"),
        ("-s", "10.0.0.2/32", "-j", "RETURN"),
        ("-s", "10.0.0.9/32", "-j", "RETURN"),
        open_to("22"), open_to("6379"), open_to("8000"), open_to("8265"), open_to("10001"),
        open_to("45000"),
        refuse("32768:60999"),
    ]  # fmt: skip


# -- the transaction --------------------------------------------------------------------------


def test_a_fresh_host_gets_both_chains_and_one_jump_each_in_one_transaction(tmp_path):
    table = capture("scratch-empty.txt").tables[IpVersion.V4]
    rules = cluster_chain(inventory(tmp_path), IpVersion.V4, [HEAD], 22)
    text = transaction(table, wanted_chains(table, "VCLUSTER-cpu-demo", rules, EPHEMERAL))
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    assert ":VCLUSTER-cpu-demo - [0:0]" in lines and f":{EPHEMERAL_CHAIN} - [0:0]" in lines
    assert "-A VCLUSTER-cpu-demo -s 10.0.0.1/32 -j RETURN" in lines
    assert lines[-3:-1] == ["-I INPUT 1 -j VCLUSTER-cpu-demo", f"-I INPUT 1 -j {EPHEMERAL_CHAIN}"]
    assert not any(line.startswith(("-D", "-F", "-X")) for line in lines)


def test_a_host_that_holds_the_rules_already_is_left_alone(tmp_path):
    host = capture("scratch-installed.txt")
    addresses = {ipaddress.ip_address(a) for a in ("10.99.0.11", "10.99.0.12", "fd00:99::11")}
    plan = host_plan(inventory(tmp_path), host, addresses, 22, node="scratch")
    assert set(plan) == {IpVersion.V4, IpVersion.V6}
    assert host_transactions(host, plan) == {}


def test_a_new_node_refills_the_chains_without_a_second_jump(tmp_path):
    host = capture("scratch-installed.txt")
    addresses = {ipaddress.ip_address(a) for a in ("10.99.0.11", "10.99.0.12", "10.99.0.13")}
    plan = host_plan(inventory(tmp_path), host, addresses, 22, node="scratch")
    lines = host_transactions(host, plan)[IpVersion.V4].splitlines()
    assert ":VCLUSTER-cpu-demo - [0:0]" in lines  # declared again: emptied, then refilled
    assert "-A VCLUSTER-cpu-demo -s 10.99.0.13/32 -j RETURN" in lines
    assert "-A VCLUSTER-EPHEMERAL -s 10.99.0.13/32 -j RETURN" in lines
    assert not any(line.startswith(("-I", "-D")) for line in lines)


def test_extra_jumps_are_removed_and_other_rules_never_named():
    table = parse_filter_table(
        "-P INPUT DROP\n-N VCLUSTER-x\n-A INPUT -s 192.0.2.7/32 -j ACCEPT\n"
        "-A INPUT -j VCLUSTER-x\n-A INPUT -j VCLUSTER-x\n-A VCLUSTER-x -i lo -j RETURN\n"
    )
    text = transaction(table, {"VCLUSTER-x": [LOOPBACK]})
    assert text == "*filter\n-D INPUT -j VCLUSTER-x\nCOMMIT\n"


def test_removing_the_last_cluster_removes_both_chains_and_their_jumps(tmp_path):
    host = capture("scratch-installed.txt")
    plan = host_plan(inventory(tmp_path), host, (), 22, node="scratch", remove=True)
    text = host_transactions(host, plan)[IpVersion.V4]
    assert text.splitlines() == [
        "*filter",
        "-D INPUT -j VCLUSTER-cpu-demo", "-F VCLUSTER-cpu-demo", "-X VCLUSTER-cpu-demo",
        f"-D INPUT -j {EPHEMERAL_CHAIN}", f"-F {EPHEMERAL_CHAIN}", f"-X {EPHEMERAL_CHAIN}",
        "COMMIT",
    ]  # fmt: skip


def test_removing_one_of_two_clusters_keeps_the_others_nodes_in_the_ephemeral_chain(tmp_path):
    first = cluster_chain(inventory(tmp_path), IpVersion.V4, [HEAD, WORKER], 22)
    other_nodes = [WORKER, ipaddress.ip_address("10.0.0.9")]
    other = cluster_chain(inventory(tmp_path, cluster="other"), IpVersion.V4, other_nodes, 22)
    chains = {"VCLUSTER-cpu-demo": first, "VCLUSTER-other": other}
    shared = ephemeral_chain(chains, EPHEMERAL)
    table = FilterTable({"INPUT": tuple(("-j", name) for name in [*chains, EPHEMERAL_CHAIN]),
                         **{n: tuple(r) for n, r in chains.items()},
                         EPHEMERAL_CHAIN: tuple(shared)})  # fmt: skip
    wanted = wanted_chains(table, "VCLUSTER-cpu-demo", None, EPHEMERAL)
    assert wanted[EPHEMERAL_CHAIN] == ephemeral_chain({"VCLUSTER-other": other}, EPHEMERAL)
    lines = (transaction(table, wanted) or "").splitlines()
    assert "-A VCLUSTER-EPHEMERAL -s 10.0.0.1/32 -j RETURN" not in lines
    assert "-A VCLUSTER-EPHEMERAL -s 10.0.0.9/32 -j RETURN" in lines
    assert "-X VCLUSTER-cpu-demo" in lines and "-X VCLUSTER-other" not in lines


# -- the probe --------------------------------------------------------------------------------


def test_the_probe_reads_the_range_addresses_listeners_and_tables():
    host = capture("scratch-installed.txt")
    assert host.ephemeral == EPHEMERAL
    assert InterfaceAddress("eth0", ipaddress.ip_address("10.99.0.11"), "global") in host.addresses
    assert host.uses_ipv6
    assert ("::", 29501) in host.listening and ("127.0.0.1", 30100) in host.listening
    table = host.tables[IpVersion.V4]
    assert table.jumps_to("VCLUSTER-cpu-demo") == 1 and table.jumps_to(EPHEMERAL_CHAIN) == 1
    assert set(table.cluster_chains()) == {"VCLUSTER-cpu-demo"}


def test_a_user_without_root_or_sudo_gets_the_host_and_the_fix(tmp_path):
    host = capture("scratch-not-root.txt")
    assert host.tables == {} and "sudo: not found" in host.unreadable[IpVersion.V4]
    with pytest.raises(FirewallError) as raised:
        host_plan(inventory(tmp_path), host, [HEAD], 22, node="node-1", user="deploy")
    error = raised.value
    assert error.where == "node-1"
    assert "cannot read the IPv4 firewall as root" in error.message
    assert "let deploy run iptables" in error.fix and "network.firewall: false" in error.fix


def test_ipv6_matters_only_where_the_host_has_ipv6(tmp_path):
    host = capture("scratch-installed.txt")
    v4_only = HostFirewall(
        host.ephemeral,
        tuple(a for a in host.addresses if a.address.version == 4),
        host.listening,
        {IpVersion.V4: host.tables[IpVersion.V4]},
        {IpVersion.V6: "ip6tables is not installed"},
    )
    assert set(host_plan(inventory(tmp_path), v4_only, [HEAD], 22, node="n")) == {IpVersion.V4}
    with_ipv6 = HostFirewall(host.ephemeral, host.addresses, host.listening,
                             v4_only.tables, v4_only.unreadable)  # fmt: skip
    with pytest.raises(FirewallError, match="IPv6 firewall") as raised:
        host_plan(inventory(tmp_path), with_ipv6, [HEAD], 22, node="n")
    assert "install ip6tables" in (raised.value.fix or "")


def test_a_nodes_addresses_are_its_cluster_interfaces_global_ones_and_those_known():
    text = (REPO / "tests" / "fixtures" / "probe" / "debian-no-gpu-no-docker.txt").read_text()
    section = text.split("@@vcluster addresses rc=0@@\n", 1)[1].split("@@", 1)[0]
    host = HostFirewall(EPHEMERAL, parse_addresses(section), (), {})
    found = node_addresses(host, "eth0", ["192.0.2.2", "node-1.example", None])
    assert found == {ipaddress.ip_address("192.0.2.2"), ipaddress.ip_address("fd00::2")}


def test_the_ports_tried_from_outside_listen_where_the_connection_arrives(tmp_path):
    host = capture("scratch-installed.txt")
    # 29501 on ::, 41234 on the node's address, 30100 on loopback only, 8000 open to all
    assert ports_to_try(inventory(tmp_path), host, "10.99.0.11", 22) == [29501, 41234]
    assert ports_to_try(inventory(tmp_path), host, "10.99.0.99", 22) == [29501]


# -- the check --------------------------------------------------------------------------------


def installed(tmp_path: Path) -> tuple[Inventory, HostFirewall, dict]:
    inv = inventory(tmp_path)
    host = capture("scratch-installed.txt")
    addresses = {ipaddress.ip_address(a) for a in ("10.99.0.11", "10.99.0.12", "fd00:99::11")}
    return inv, host, {"plan": host_plan(inv, host, addresses, 22, node="n"), "nodes": addresses}


def test_the_check_passes_when_the_chains_hold_and_this_machine_is_refused(tmp_path):
    inv, host, found = installed(tmp_path)
    attempts = [Attempt(29501, "refused"), Attempt(41234, "refused")]
    result = check_node(inv, "node-1", host, found["plan"], running=True, attempts=attempts,
                        node_addresses=found["nodes"])  # fmt: skip
    assert result.status is Status.PASS
    assert result.detail == (
        "VCLUSTER-cpu-demo installed (IPv4, IPv6); from this machine, refused: 29501, 41234"
    )


def test_a_port_that_accepts_this_machine_fails_the_check(tmp_path):
    inv, host, found = installed(tmp_path)
    attempts = [Attempt(29501, "connected", "10.99.0.1")]
    result = check_node(inv, "node-1", host, found["plan"], running=True, attempts=attempts,
                        node_addresses=found["nodes"])  # fmt: skip
    assert result.status is Status.FAIL and "29501 accepted a connection" in result.detail


def test_from_a_node_the_check_cannot_tell_and_says_so(tmp_path):
    inv, host, found = installed(tmp_path)
    attempts = [Attempt(29501, "connected", "10.99.0.12")]
    result = check_node(inv, "node-1", host, found["plan"], running=True, attempts=attempts,
                        node_addresses=found["nodes"])  # fmt: skip
    assert result.status is Status.PASS and "this machine is a node (10.99.0.12)" in result.detail


def test_missing_chains_pass_before_up_and_fail_while_the_cluster_runs(tmp_path):
    inv = inventory(tmp_path)
    host = capture("scratch-empty.txt")
    plan = host_plan(inv, host, [HEAD], 22, node="n")
    before = check_node(inv, "n", host, plan, running=False, attempts=[], node_addresses={HEAD})
    assert before.status is Status.PASS and "not installed yet" in before.detail
    running = check_node(inv, "n", host, plan, running=True, attempts=[], node_addresses={HEAD})
    assert running.status is Status.FAIL
    assert "VCLUSTER-cpu-demo is missing" in running.detail and "vcluster up" in running.remedy


def test_with_the_firewall_off_each_exposed_port_warns(tmp_path):
    inv = inventory(tmp_path, network={"interface": "eth0", "firewall": False})
    results = check_disabled(inv, "node-1", capture("scratch-installed.txt"), 22)
    assert [r.status for r in results] == [Status.WARN, Status.WARN]
    assert results[0].detail == (
        "port 29501 (vLLM's rendezvous (torch store)) is open to any address: "
        "network.firewall is false"
    )
    assert "ephemeral range 32768-60999" in results[1].detail and "41234" in results[1].detail
    idle = dataclasses.replace(capture("scratch-empty.txt"), listening=())
    nothing = check_disabled(inv, "node-1", idle, 22)
    assert len(nothing) == 1 and "32768-60999 will be open to any address" in nothing[0].detail


def test_a_refused_transaction_is_told_in_one_line_without_the_usage_hint():
    # iptables-restore 1.8.9 (nf_tables), a port out of range at line 4 (captured here)
    stderr = (
        "iptables-restore v1.8.9 (nf_tables): invalid port/service `99999' specified\n"
        "Error occurred at line: 4\n"
        "Try `iptables-restore -h' or 'iptables-restore --help' for more information.\n"
    )
    assert restore_message(stderr) == (
        "iptables-restore v1.8.9 (nf_tables): invalid port/service `99999' specified "
        "Error occurred at line: 4"
    )


# -- the sandbox, serving (real captures of `up`'s result) -----------------------------------


def test_on_the_serving_sandbox_up_leaves_nothing_to_change(tmp_path):
    e2e = inventory(tmp_path, cluster="e2e")
    head, worker = capture("sandbox-head.txt"), capture("sandbox-worker.txt")
    addresses = node_addresses(head, "eth0", ["172.30.0.11"]) | node_addresses(
        worker, "eth0", ["172.30.0.12"]
    )
    assert addresses == {ipaddress.ip_address("172.30.0.11"), ipaddress.ip_address("172.30.0.12")}
    for host in (head, worker):
        assert not host.uses_ipv6  # docker0 and eth0 have IPv4 only; ip6tables works still
        plan = host_plan(e2e, host, addresses, 22, node="node")
        assert set(plan) == {IpVersion.V4, IpVersion.V6}
        assert host_transactions(host, plan) == {}


def test_on_the_sandbox_head_check_tries_the_rendezvous_metrics_and_two_rank_ports(tmp_path):
    head = capture("sandbox-head.txt")
    tried = ports_to_try(inventory(tmp_path, cluster="e2e"), head, "172.30.0.11", 22)
    # 30100 (vLLM) listens on loopback only, 8000 (the router) is open to everyone
    assert tried == [8080, 29501, 44217, 44227, 33169, 35221]
