"""What a node's container listens on, and what protects each port: the `ports` check.

With host networking every port the container opens is a port of the server. The listing is
read inside the container (`docker exec`, root there, so /proc shows which process owns each
socket); the classification below is pure and tested on a real capture from the sandbox.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass

from cluster.decide.checks.result import CheckResult, Status
from cluster.decide.firewall import protected_ports
from cluster.decide.inventory import Inventory
from cluster.facts.ray import RAY_FIXED_METRICS_PORTS
from cluster.remote.supervisor import TCP_LISTEN, parse_tcp_table

# Prints one marked JSON line: the kernel's TCP tables and each process's command line and
# socket inodes. Values come from /proc only; nothing is pasted into the code.
LISTENERS_SCRIPT = """\
import json, os
tables = {}
for name in ("tcp", "tcp6"):
    try:
        tables[name] = open("/proc/net/" + name).read()
    except OSError:
        tables[name] = ""
processes = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdline = open("/proc/%s/cmdline" % pid, "rb").read().replace(b"\\0", b" ").decode(errors="replace").strip()
        inodes = []
        for fd in os.listdir("/proc/%s/fd" % pid):
            target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
    except OSError:
        continue
    processes[pid] = {"cmdline": cmdline[:300], "inodes": inodes}
print("VCLUSTER-LISTENERS " + json.dumps({"tables": tables, "processes": processes}))
"""
_MARKER = "VCLUSTER-LISTENERS "
HOST_PROCESS = "?"
"""The owner of a socket that no process in the container holds: one of the host's."""


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: where it listens, which process, what protects it."""

    address: str
    port: int
    process: str
    component: str
    protection: str  # localhost only, Ray token, API key, agent token, none, none (read-only), not vcluster's

    @property
    def open_to_anyone(self) -> bool:
        return self.protection.startswith("none")


FIREWALLED = "cluster nodes only (firewall)"


def listeners_argv() -> list[str]:
    return ["python3", "-c", LISTENERS_SCRIPT]


def parse_listeners(output: str) -> list[tuple[str, int, str]]:
    """(address, port, owning command line) of every listening socket in the script's output."""
    for line in output.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line.removeprefix(_MARKER))
            break
    else:
        raise ValueError(f"no listener list in the output: {output.strip()[-300:]!r}")
    owner = {
        inode: info["cmdline"] for info in data["processes"].values() for inode in info["inodes"]
    }
    found = set()
    for text in data["tables"].values():
        for address, port, _, _, state, inode in parse_tcp_table(text):
            if state == TCP_LISTEN:
                found.add((address, port, owner.get(inode, HOST_PROCESS)))
    return sorted(found, key=lambda entry: (entry[1], entry[0]))


def classify(address: str, port: int, process: str, inventory: Inventory) -> Listener:
    """Name the component behind a listening socket and what protects it (pure)."""
    component = _component(port, process, inventory)
    if ipaddress.ip_address(address).is_loopback:
        protection = "localhost only"
    elif process == HOST_PROCESS:
        protection = "not vcluster's"
    elif component == "Ray metrics (Prometheus)":
        protection = "none (read-only)"
    elif component.startswith("Ray"):
        protection = "Ray token"
    elif component in ("vLLM API", "router (the endpoint)"):
        protection = "API key" if inventory.secrets.api_key is not None else "none"
    elif component == "model agent":
        protection = "agent token"
    elif component == "a model's own API server":
        # vLLM checks its key (the agent token) only under /v1 (vllm-project/vllm#58144)
        protection = "none beyond /v1 (agent token)"
    else:
        protection = "none"
    if protection.startswith("none") and _firewalled(port, component, inventory):
        protection = FIREWALLED
    return Listener(address, port, _short(process), component, protection)


def _firewalled(port: int, component: str, inventory: Inventory) -> bool:
    """Whether vcluster's firewall lets only the cluster's nodes reach the port: its fixed
    unauthenticated ports, and the ranks' ports the kernel picks (the ephemeral range); the
    `firewall` check verifies that the rules hold."""
    if not inventory.network.firewall:
        return False
    if component == "vLLM internal (ZMQ, gloo)":
        return True
    return any(port in span for span in protected_ports(inventory))


def _component(port: int, process: str, inventory: Inventory) -> str:
    if process == HOST_PROCESS:
        return "sshd" if port == 22 else "a host process, outside the container"
    serving = "serving.pyz" in process
    if port == inventory.ports.vllm and serving:
        return "router (the endpoint)"
    if port == inventory.ports.agent and serving:
        return "model agent"
    model_port = _model_port(port, inventory)
    if model_port is not None and ("vllm" in process.lower() or "VLLM" in process):
        return model_port
    vllm = "vllm" in process.lower() or "VLLM" in process
    if vllm and port in (inventory.ports.vllm, inventory.ports.models) and not inventory.routed:
        return "vLLM API"  # behind the router on loopback; on the endpoint port in older clusters
    if port == inventory.ports.master:
        return "vLLM rendezvous (torch.distributed store)"
    if "VLLM::" in process or "vllm serve" in process:
        return "vLLM internal (ZMQ, gloo)"
    if "ray" in process and port in (inventory.ports.ray_metrics, *RAY_FIXED_METRICS_PORTS):
        return "Ray metrics (Prometheus)"
    for needle, name in (
        ("gcs_server", "Ray GCS"),
        ("raylet", "Ray raylet"),
        ("ray.util.client.server", "Ray client server"),
        ("dashboard/dashboard.py", "Ray dashboard"),
        ("dashboard/agent.py", "Ray dashboard agent"),
        ("runtime_env/agent", "Ray runtime env agent"),
        ("autoscaler/_private/monitor.py", "Ray autoscaler monitor"),
        ("ray::", "Ray worker"),
        ("default_worker.py", "Ray worker"),
    ):
        if needle in process:
            return name
    return "other"


def _model_port(port: int, inventory: Inventory) -> str | None:
    """With several models, model i listens on ports.models + 2i, its ranks meet on the next."""
    offset = port - inventory.ports.models
    if not inventory.routed or not 0 <= offset < 2 * len(inventory.model_list):
        return None
    return (
        "a model's own API server"
        if offset % 2 == 0
        else "a model's rendezvous (torch.distributed store)"
    )


def _short(process: str) -> str:
    words = process.split()
    return " ".join(word.rsplit("/", 1)[-1] for word in words[:2])[:40] or "?"


def check_listeners(
    inventory: Inventory, listeners: Mapping[str, list[Listener]]
) -> list[CheckResult]:
    """One `ports` result per node: every port open to the network and what protects it."""
    results = []
    for node, found in listeners.items():
        exposed = [
            entry for entry in found if entry.protection not in ("localhost only", "not vcluster's")
        ]
        detail = ", ".join(f"{e.port} {e.component} ({e.protection})" for e in exposed)
        unprotected = [e for e in exposed if e.open_to_anyone]
        if unprotected:
            results.append(
                CheckResult(
                    "ports",
                    Status.WARN,
                    "open without authentication: "
                    + ", ".join(f"{e.port} {e.component}" for e in unprotected)
                    + f"; all: {detail}",
                    node,
                    "let only the cluster's nodes reach these ports: `network.firewall: true` "
                    "(the default) or a firewall of your own; see docs/firewall.md",
                )
            )
        else:
            results.append(CheckResult("ports", Status.PASS, detail or "nothing open", node))
    return results
