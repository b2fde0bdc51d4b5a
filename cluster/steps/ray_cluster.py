"""Steps: wait for the Ray head, then for every node to be alive in Ray with its resources."""

from __future__ import annotations

from cluster.decide.plan import NodePlan
from cluster.errors import VclusterError
from cluster.facts.ray import (
    RayNode,
    RayQueryError,
    alive_by_address,
    parse_ray_nodes,
    ray_nodes_argv,
)
from cluster.nodes.containers import container_logs, inspect_container
from cluster.steps.base import wait_until
from cluster.steps.context import UpContext

POLL_INTERVAL_S = 2.0
LOG_LINES = 5


class RayNotReady(VclusterError):
    """Ray did not report every node in time."""


def query_ray_nodes(context: UpContext) -> list[RayNode] | str:
    """Ray's nodes as the head sees them, or why they could not be read."""
    plan = context.require_plan()
    head = plan.head
    container = context.session.docker(head.name).containers.get(head.container.name)
    result = container.exec_run(ray_nodes_argv(head.facts.address, context.inventory.ports.ray))
    output = result.output.decode(errors="replace")
    if result.exit_code != 0:
        return f"Ray query failed: {output.strip().splitlines()[-1:] or ['no output']}"
    try:
        return parse_ray_nodes(output)
    except RayQueryError as exc:
        return str(exc)


def wait_for_ray_head(context: UpContext) -> str:
    """Until the new Ray head is alive (the step list skips it when the head's container is
    kept: the next step's query sees the head with the others, one Ray client start saved)."""
    head = context.require_plan().head

    def missing() -> str | None:
        nodes = query_ray_nodes(context)
        if isinstance(nodes, str):
            return "head not answering yet"
        return None if head.facts.address in alive_by_address(nodes) else "head not alive"

    still = wait_until(
        missing,
        timeout_s=context.options.ray_timeout_s,
        interval_s=POLL_INTERVAL_S,
        reporter=context.reporter,
        waiting_for="Ray head",
    )
    if still is not None:
        raise _not_ready(context, [head.name], still)
    return f"{head.facts.address}:{context.inventory.ports.ray}"


def wait_for_ray_nodes(context: UpContext) -> str:
    plan = context.require_plan()
    expected = {n.facts.address: n for n in plan.nodes}
    last: dict[str, RayNode] = {}

    def missing() -> str | None:
        nodes = query_ray_nodes(context)
        if isinstance(nodes, str):
            return nodes
        last.clear()
        last.update(alive_by_address(nodes))
        absent = [n.name for address, n in expected.items() if address not in last]
        return f"waiting for {', '.join(absent)}" if absent else None

    still = wait_until(
        missing,
        timeout_s=context.options.ray_timeout_s,
        interval_s=POLL_INTERVAL_S,
        reporter=context.reporter,
        waiting_for="Ray nodes",
    )
    if still is not None:
        absent = [n.name for address, n in expected.items() if address not in last]
        raise _not_ready(context, absent or [plan.head.name], still)
    if context.inventory.accelerator == "cpu":
        total = sum(last[a].cpus for a in expected)
        return f"{len(expected)}/{len(expected)} nodes alive, {total:g} CPUs"
    total = sum(last[a].gpus for a in expected)
    return f"{len(expected)}/{len(expected)} nodes alive, {total:g} GPUs"


def check_ray_topology(context: UpContext) -> str:
    """Ray's view against the facts: every node's GPUs seen by Ray, TP x PP = cluster GPUs."""
    plan = context.require_plan()
    if plan.accelerator == "cpu":
        return (
            f"cpu mode: pipeline parallel {plan.pipeline_parallel} across {len(plan.nodes)} nodes"
        )
    nodes = query_ray_nodes(context)
    if isinstance(nodes, str):
        raise RayNotReady(nodes, where=plan.head.name)
    alive = alive_by_address(nodes)
    given = {n.name: _gpus_given(n) for n in plan.nodes}
    wrong = [
        f"{n.name}: Ray sees {alive[n.facts.address].gpus:g} GPUs, the container has {given[n.name]}"
        f" (nvidia-smi on the host: {n.facts.gpu_count})"
        for n in plan.nodes
        if n.facts.address in alive and alive[n.facts.address].gpus != given[n.name]
    ]
    if wrong:
        raise RayNotReady(
            "Ray does not see the GPUs the node has: " + "; ".join(wrong),
            where=", ".join(w.split(":")[0] for w in wrong),
            fix="check the NVIDIA container toolkit and CUDA_VISIBLE_DEVICES on those nodes",
        )
    total = sum(given.values())
    if plan.routed:
        return f"{total} GPUs for the models; Ray agrees with nvidia-smi on every node"
    return (
        f"{total} GPUs = TP {plan.tensor_parallel} x PP {plan.pipeline_parallel}; "
        "Ray agrees with nvidia-smi on every node"
    )


def _gpus_given(node: NodePlan) -> int:
    """The GPUs the node's container has: its `gpu_ids`, or every one the host has."""
    gpus = node.container.gpus
    return len(gpus) if isinstance(gpus, tuple) else node.facts.gpu_count


def _not_ready(context: UpContext, nodes: list[str], still: str) -> RayNotReady:
    plan = context.require_plan()
    details = []
    for name in nodes:
        client = context.session.docker(name)
        state = inspect_container(client, plan.node(name).container.name)
        status = "no container" if state is None else state.status
        tail = " | ".join(
            container_logs(client, plan.node(name).container.name, LOG_LINES).splitlines()
        )
        details.append(f"{name}: container {status}; last log lines: {tail or '(none)'}")
    return RayNotReady(
        f"Ray did not report every node within {context.options.ray_timeout_s:g}s ({still}). "
        + " / ".join(details),
        where=", ".join(nodes),
        fix="check that the workers reach the head's Ray port (vcluster check) and the interface",
    )
