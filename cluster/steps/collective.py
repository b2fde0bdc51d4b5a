"""The collective check, run for real: the all-reduce program in every node's running container,
all nodes at once, bounded in time, and nothing of it left running afterwards.

`vcluster check --collective` runs it on a cluster that is up; `up` runs it before vLLM starts
when the inventory says `collective.in_up: true` (a FAIL stops `up` there). The last run's
figures are kept on the controller for the exporter's gauges.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from cluster.decide.checks import CheckResult, Status, failed
from cluster.decide.collective_report import (
    CollectiveRun,
    NodeHcas,
    nvlink_bandwidth,
    read_run,
    verdicts,
)
from cluster.decide.inventory import Inventory
from cluster.decide.plan import ClusterPlan
from cluster.errors import VclusterError
from cluster.facts.host import HostFacts
from cluster.nodes.containers import inspect_container
from cluster.nodes.session import Session
from cluster.nodes.transport.ssh import CommandTimeout
from cluster.remote.collective import MIB, PID_FILE
from cluster.remote.registry import COLLECTIVE, source
from cluster.report.collective_store import save_last_run
from cluster.steps.context import UpContext

SSH_GRACE_S = 30.0
"""Beyond the check's own time limit, for the nodes' alarms to fire and their lines to arrive."""
STOP_SCRIPT = (
    f'f={PID_FILE}; [ -f "$f" ] && kill -s KILL -- "-$(cat "$f")" 2>/dev/null; rm -f "$f"; true'
)
"""Kill the check's process group in a container, if one is left (constant: no user value)."""


@dataclass(frozen=True)
class CollectiveOutcome:
    run: CollectiveRun
    results: list[CheckResult]
    seconds: float


def program_source() -> str:
    """The program each container runs as `python3 -c SOURCE CONFIG`."""
    return source(COLLECTIVE)


def sizes(max_size_mib: int) -> list[int]:
    """1 MiB, 4 MiB, 16 MiB, ... up to the largest size (as nccl-tests' -f 4)."""
    found, size = [], MIB
    while size <= max_size_mib * MIB:
        found.append(size)
        size *= 4
    return found


def node_configs(inventory: Inventory, plan: ClusterPlan) -> dict[str, dict]:
    """Each node's config of the program: its rank, the world, the rendezvous on the head."""
    settings = inventory.collective
    gpus = inventory.accelerator == "nvidia"
    configs = {}
    for node_rank, node in enumerate(plan.nodes):  # the head first: it holds rank 0
        configs[node.name] = {
            "backend": "nccl" if gpus else "gloo",
            "master": [plan.head.facts.address, inventory.ports.collective],
            "node_rank": node_rank,
            "nnodes": len(plan.nodes),
            "local_size": max(node.facts.gpu_count, 1) if gpus else 1,
            "node": node.name,
            "sizes": sizes(settings.max_size_mib),
            "join_timeout_s": settings.join_timeout_s,
            "time_limit_s": settings.time_limit_s,
        }
    return configs


def node_hcas(inventory: Inventory, host_facts: dict[str, HostFacts]) -> dict[str, NodeHcas]:
    """Each node's active HCA ports (those `network.ib_hcas` names), from the host probe: what
    NCCL is expected to cross the nodes with."""
    named = inventory.network.ib_hcas
    found = {}
    for name, facts in host_facts.items():
        ib = facts.fabric.infiniband
        ports = tuple(
            port
            for port in ib.active_ports
            if named is None or port.hca in named or port.name in named
        )
        found[name] = NodeHcas(ports, ib.device_files, facts.fabric.peer_memory)
    return found


def run_collective(
    inventory: Inventory,
    session: Session,
    plan: ClusterPlan,
    host_facts: dict[str, HostFacts],
) -> CollectiveOutcome:
    """Run the check on every node's container; the verdict rows (FAIL where a node is not up)."""
    started = time.monotonic()
    container = plan.head.container.name
    down = _not_running(session, plan, container)
    if down:
        rows = [
            CheckResult(
                "collective",
                Status.FAIL,
                f"the cluster's container is {state}",
                node,
                "run `vcluster up` first: the check runs in the cluster's containers",
            )
            for node, state in down.items()
        ]
        seconds = time.monotonic() - started
        save_last_run(inventory.cluster, CollectiveRun(), rows, seconds)
        return CollectiveOutcome(CollectiveRun(), rows, seconds)
    source = program_source()
    configs = node_configs(inventory, plan)
    limit = inventory.collective.time_limit_s + SSH_GRACE_S

    def on_node(name: str) -> str:
        argv = ["docker", "exec", container, "python3", "-c", source, json.dumps(configs[name])]
        try:
            result = session.ssh(name).run(argv, timeout=limit)
        except CommandTimeout:
            return f"no answer within {limit:g} s (the check's time limit and {SSH_GRACE_S:g} s)"
        except VclusterError as error:
            return error.one_line()
        return result.stdout + result.stderr

    try:
        outputs = session.on_each(on_node, [n.name for n in plan.nodes])
    finally:
        stopped = session.on_each(
            lambda n: session.ssh(n).run(["docker", "exec", container, "sh", "-c", STOP_SCRIPT]),
            [n.name for n in plan.nodes],
        )
    texts = {name: outputs[name].value or "" for name in configs}
    texts.update({n: error.one_line() for n, error in outputs.failed.items()})
    run = read_run(texts)
    gpu_names = {n.name: n.facts.gpu_model for n in plan.nodes}
    intra = {
        name: nvlink_bandwidth(facts.gpu.topology, gpu_names.get(name))
        for name, facts in host_facts.items()
    }
    backend = next(iter(configs.values()))["backend"]
    rows = verdicts(
        run,
        backend=backend,
        nodes=list(configs),
        intra_limit=intra,
        join_timeout_s=inventory.collective.join_timeout_s,
        hcas=node_hcas(inventory, host_facts),
        ib_disabled=inventory.env.get("NCCL_IB_DISABLE") == "1",
    )
    rows += [
        CheckResult(
            "collective",
            Status.WARN,
            f"could not make sure nothing of the check is left: {error.one_line()}",
            node,
        )
        for node, error in stopped.failed.items()
    ]
    seconds = time.monotonic() - started
    save_last_run(inventory.cluster, run, rows, seconds)
    return CollectiveOutcome(run, rows, seconds)


def _not_running(session: Session, plan: ClusterPlan, container: str) -> dict[str, str]:
    def state(name: str) -> str | None:
        found = inspect_container(session.docker(name), container)
        if found is None:
            return "missing"
        return None if found.running else found.status

    outcome = session.on_each(state, [n.name for n in plan.nodes])
    down = {n: s for n, s in outcome.succeeded.items() if s is not None}
    down.update({n: f"unknown ({e.one_line()})" for n, e in outcome.failed.items()})
    return down


def collective_step(context: UpContext) -> str:
    """`up`'s step: the check before vLLM starts, when the inventory asks for it and no vLLM
    may hold the GPUs (the step list says when: cluster/decide/up/steps.py)."""
    inventory = context.inventory
    plan = context.require_plan()
    outcome = run_collective(inventory, context.session, plan, context.host_facts)
    problems = failed(outcome.results)
    if problems:
        raise VclusterError(
            "the collective check failed: " + "; ".join(f"{r.node}: {r.detail}" for r in problems),
            where=", ".join(sorted({r.node or "cluster" for r in problems})),
            fix=problems[0].remedy,
        )
    best = max((m.busbw for m in outcome.run.measurements), default=0.0)
    return (
        f"{len(outcome.results)} PASS/WARN row(s), best busbw {best / 1e9:.1f} GB/s "
        f"({outcome.seconds:.0f} s)"
    )
