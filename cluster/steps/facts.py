"""Step: one probe per host, in parallel: what the plan and the checks need to know."""

from __future__ import annotations

from cluster.decide.inventory import Inventory
from cluster.decide.plan import NodeFacts
from cluster.facts.host import HostFacts, parse_probe, probe_argv
from cluster.steps.context import UpContext


def gather_facts(context: UpContext) -> str:
    inventory = context.inventory
    head_address = inventory.head.address

    def probe(name: str) -> HostFacts:
        argv = probe_argv(head_address=head_address, model_cache=inventory.model_cache)
        result = context.session.ssh(name).run(argv)
        return parse_probe(result.stdout)

    outcome = context.session.on_each(probe)
    outcome.raise_if_failed("gathering facts")
    context.host_facts = outcome.succeeded
    context.node_facts = {  # `check` goes on without the nodes it could not reach
        node.node_name: node_facts(context.host_facts[node.node_name], node.address, inventory)
        for node in inventory.nodes
        if node.node_name in context.host_facts
    }
    return ", ".join(
        f"{name}: {f.gpu_count} GPU(s)" if inventory.accelerator == "nvidia" else f"{name}: cpu"
        for name, f in context.node_facts.items()
    )


def node_facts(facts: HostFacts, address: str, inventory: Inventory) -> NodeFacts:
    """What the plan needs of a node, from its probe."""
    gpus = facts.gpus if inventory.accelerator == "nvidia" else []
    return NodeFacts(
        address=address,
        gpu_count=len(gpus),
        gpu_model=gpus[0].name if gpus else None,
        interface=facts.route_interface,
        fabric=facts.fabric,
        memory_bytes=facts.memory_bytes,
        gpu_memory_mib=min((g.memory_total_mib for g in gpus if g.memory_total_mib), default=None),
    )
