"""The `ports` check: what a node's container listens on and what protects each port, read from
real captures of the sandbox (tests/fixtures/listeners)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cluster.decide.checks import Status
from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.listeners import (
    FIREWALLED,
    Listener,
    check_listeners,
    classify,
    parse_listeners,
)
from tests.unit.test_plan import example

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "listeners"


def listeners(name: str, inventory: Inventory) -> list[Listener]:
    found = parse_listeners((FIXTURES / name).read_text())
    return [classify(address, port, process, inventory) for address, port, process in found]


def by_port(found: list[Listener]) -> dict[int, set[tuple[str, str]]]:
    ports: dict[int, set[tuple[str, str]]] = {}
    for entry in found:
        ports.setdefault(entry.port, set()).add((entry.component, entry.protection))
    return ports


def test_with_the_firewall_the_ports_without_authentication_are_for_the_nodes_only():
    inventory = example("cpu-2.yaml")
    found = {"node-1": listeners("sandbox-head.txt", inventory)}
    ports = by_port(found["node-1"])
    assert ports[29501] == {("vLLM rendezvous (torch.distributed store)", FIREWALLED)}
    assert ports[8080] == {("Ray metrics (Prometheus)", FIREWALLED)}
    (result,) = check_listeners(inventory, found)
    assert result.status is Status.PASS and "29501 vLLM rendezvous" in result.detail


def test_the_heads_ray_ports_require_the_token_and_the_dashboard_is_local():
    ports = by_port(listeners("sandbox-head.txt", without_firewall(example("cpu-2.yaml"))))
    assert ports[6379] == {("Ray GCS", "Ray token")}
    assert ("Ray client server", "Ray token") in ports[10001]
    assert ports[8265] == {("Ray dashboard", "localhost only")}
    assert ports[8000] == {("vLLM API", "API key")}
    assert ports[8080] == {("Ray metrics (Prometheus)", "none (read-only)")}
    assert ports[29501] == {("vLLM rendezvous (torch.distributed store)", "none")}
    assert ports[22] == {("sshd", "not vcluster's")}


def without_firewall(inventory: Inventory) -> Inventory:
    return inventory.model_copy(
        update={"network": inventory.network.model_copy(update={"firewall": False})}
    )


def test_without_the_firewall_the_check_warns_about_every_port_open_without_authentication():
    inventory = without_firewall(example("cpu-2.yaml"))
    found = {
        "node-1": listeners("sandbox-head.txt", inventory),
        "node-2": listeners("sandbox-worker.txt", inventory),
    }
    results = {r.node: r for r in check_listeners(inventory, found)}
    head = results["node-1"]
    assert head.status is Status.WARN and head.remedy and "firewall" in head.remedy
    unprotected = head.detail.split("; all: ")[0]
    assert "29501 vLLM rendezvous" in unprotected and "8080 Ray metrics" in unprotected
    assert "6379" not in unprotected and "8000" not in unprotected and "22 " not in unprotected
    assert "8265" not in head.detail  # localhost only: not open to the network at all
    assert results["node-2"].status is Status.WARN


def test_without_an_api_key_the_endpoint_is_open_to_anyone():
    inventory = example("cpu-2.yaml")
    keyless = inventory.model_copy(
        update={"secrets": inventory.secrets.model_copy(update={"api_key": None})}
    )
    ports = by_port(listeners("sandbox-head.txt", keyless))
    assert ports[8000] == {("vLLM API", "none")}


def test_a_cluster_with_only_authenticated_ports_passes():
    inventory = example("cpu-2.yaml")
    safe = [e for e in listeners("sandbox-head.txt", inventory) if not e.open_to_anyone]
    (result,) = check_listeners(inventory, {"node-1": safe})
    assert result.status is Status.PASS and "6379 Ray GCS (Ray token)" in result.detail


def routed_inventory(tmp_path: Path) -> Inventory:
    """The sandbox's inventory (inventory/cpu-2.yaml) with the two tiny models of the capture."""
    document = yaml.safe_load((REPO / "inventory" / "cpu-2.yaml").read_text())
    del document["model"]
    document["models"] = [
        {"name": "/data/hf/models/tiny-llama", "served_name": "tiny-a"},
        {"name": "/data/hf/models/tiny-llama-b", "served_name": "tiny-b"},
    ]
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(document))
    return load_inventory(tmp_path / "inventory.yaml")


def test_with_several_models_the_router_agents_and_models_servers_are_named(tmp_path):
    inventory = routed_inventory(tmp_path)
    head = by_port(listeners("routed-head.txt", inventory))
    assert head[8000] == {("router (the endpoint)", "API key")}
    assert head[29513] == {("model agent", "agent token")}
    assert head[30100] == {("a model's own API server", "localhost only")}
    assert head[30101] == {("a model's rendezvous (torch.distributed store)", FIREWALLED)}
    worker = by_port(listeners("routed-worker.txt", inventory))
    assert worker[29513] == {("model agent", "agent token")}


def test_with_one_model_the_router_is_the_endpoint_and_vllm_listens_on_loopback_only():
    inventory = example("cpu-2.yaml")
    head = by_port(listeners("front-node-1.txt", inventory))
    assert head[8000] == {("router (the endpoint)", "API key")}
    assert head[30100] == {("vLLM API", "localhost only")}
    assert head[29501] == {("vLLM rendezvous (torch.distributed store)", FIREWALLED)}
    found = {
        "node-1": listeners("front-node-1.txt", inventory),
        "node-2": listeners("front-node-2.txt", inventory),
    }
    results = check_listeners(inventory, found)
    assert [r.status for r in results] == [Status.PASS, Status.PASS]
    assert all(e.protection != "none" for found_here in found.values() for e in found_here)


def test_a_models_own_server_off_the_head_is_open_beyond_v1_unless_the_firewall_holds(tmp_path):
    inventory = routed_inventory(tmp_path)
    process = "/opt/venv/bin/python3 /opt/venv/bin/vllm serve /data/hf/models/tiny-llama-b"
    firewalled = classify("172.30.0.12", 30102, process, inventory)
    assert (firewalled.component, firewalled.protection) == (
        "a model's own API server",
        FIREWALLED,
    )
    exposed = classify("172.30.0.12", 30102, process, without_firewall(inventory))
    assert exposed.protection == "none beyond /v1 (agent token)" and exposed.open_to_anyone
