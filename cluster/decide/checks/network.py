"""Rules over the network: the head's ports, each node's route to the head, the workers
reaching it, and who may use the endpoint (its users' key)."""

from __future__ import annotations

from collections.abc import Mapping

from cluster.decide.checks.result import CheckInput, CheckResult, Status, fails, passes, warns
from cluster.decide.inventory import Inventory
from cluster.decide.runtime import Runtime


def uses_ray(inventory: Inventory, runtime: Runtime | None) -> tuple[bool, str]:
    """(whether the nodes form a Ray cluster, vLLM's executor): the runtime's, or by default."""
    if runtime is None:
        return True, inventory.default_executor
    return runtime.ray, runtime.executor


def head_port(inventory: Inventory, runtime: Runtime | None) -> int:
    """The port the workers meet the head at first: Ray's, or vLLM's rendezvous without Ray."""
    return inventory.ports.ray if uses_ray(inventory, runtime)[0] else inventory.ports.master


def check_head_ports(given: CheckInput) -> list[CheckResult]:
    """The ports the head will listen on (Ray, vLLM, the mp rendezvous) are free."""
    head = given.inventory.head.node_name
    facts = given.facts.get(head)
    if facts is None:
        return []
    ports = given.inventory.ports
    ray, executor = uses_ray(given.inventory, given.runtime)
    wanted = {"the endpoint": ports.vllm}
    if not given.inventory.routed:
        wanted["vLLM (loopback)"] = ports.models
    if ray:
        wanted["Ray"] = ports.ray
    if executor == "mp":
        wanted["torch.distributed"] = ports.master
    listed = ", ".join(f"{what} {port}" for what, port in wanted.items())
    busy = ", ".join(f"{w} {p}" for w, p in wanted.items() if p in facts.listening_ports)
    if not busy:
        return [passes("head ports", head, f"free: {listed}")]
    if given.cluster_running_on_head:
        detail = f"in use by this cluster's container: {busy}"
        return [passes("head ports", head, detail)]
    return [
        fails(
            "head ports",
            head,
            f"already in use on the head: {busy}",
            "stop what listens there (`ss -ltnp`), or choose other ports: in the inventory",
        )
    ]


def check_api_key(given: CheckInput) -> list[CheckResult]:
    """The endpoint has a users' key, or the inventory says on purpose that it has none."""
    inventory = given.inventory
    if inventory.secrets.api_key is not None:
        return [passes("api key", None, "every route of the endpoint but /health needs the key")]
    if inventory.router.allow_anonymous:
        return [
            warns(
                "api key",
                None,
                "router.allow_anonymous: anyone who reaches the endpoint uses the models",
                "set secrets.api_key (env:NAME or file:/path) unless the network is yours alone",
            )
        ]
    return [
        fails(
            "api key",
            None,
            "no secrets.api_key: anyone who reaches the endpoint would use the models",
            "set secrets.api_key: env:NAME or file:/path (or router.allow_anonymous: true)",
        )
    ]


def check_route_to_head(given: CheckInput) -> list[CheckResult]:
    """The interface each node reaches the head by: NCCL/Gloo's interface and VLLM_HOST_IP's."""
    configured = given.inventory.network.interface
    results = []
    for name, facts in given.probed():
        route = facts.route
        if route.interface is None:
            status = Status.WARN if configured else Status.FAIL
            detail = f"no route to the head found: {route.problem}"
            remedy = "check the head's address and this node's routing (`ip route get HEAD`)"
            if configured is None:
                remedy += ", or set network.interface in the inventory"
            results.append(CheckResult("route to head", status, detail, name, remedy))
        elif configured and route.interface != configured:
            results.append(
                warns(
                    "route to head",
                    name,
                    f"routes to the head via {route.interface}, network.interface is {configured}",
                    "check network.interface: NCCL and Gloo would use an interface "
                    "the route to the head does not",
                )
            )
        else:
            source = f", source {route.source_address}" if route.source_address else ""
            results.append(passes("route to head", name, f"via {route.interface}{source}"))
    return results


def check_workers_reach_head(
    inventory: Inventory, reached: Mapping[str, str | None], runtime: Runtime | None = None
) -> list[CheckResult]:
    """Each worker opened a TCP connection to the head's Ray (or rendezvous) port.

    `reached[worker]` is None when it connected, else the error the worker saw.
    """
    port = head_port(inventory, runtime)
    head = inventory.head.address
    results = []
    for name, error in reached.items():
        if error is None:
            results.append(passes("reach head", name, f"{head}:{port} reached"))
        else:
            results.append(
                fails(
                    "reach head",
                    name,
                    f"cannot reach {head}:{port}: {error}",
                    f"open TCP {port} and the ports Ray/NCCL use between the nodes in the "
                    "firewall (or security group), and check the route",
                )
            )
    return results
