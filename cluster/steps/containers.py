"""Steps: the head's container (Ray head), then every worker's container at once, each as the
Planning step decided (cluster/decide/up/containers.py): created, replaced or kept."""

from __future__ import annotations

from cluster.decide.plan import NodePlan
from cluster.decide.up.containers import ContainerAction, SpecChanged, Verb
from cluster.nodes.containers import create_container, remove_container
from cluster.steps.context import UpContext

__all__ = ["SpecChanged", "start_head", "start_workers"]


def start_head(context: UpContext) -> str:
    decision = context.require_decision()
    head = decision.plan.head
    return _apply(context, head, decision.containers[head.name])


def start_workers(context: UpContext) -> str:
    decision = context.require_decision()
    plan = decision.plan
    outcome = context.session.on_each(
        lambda name: _apply(context, plan.node(name), decision.containers[name]),
        [w.name for w in plan.workers],
    )
    outcome.raise_if_failed("starting worker containers")
    if not plan.workers:
        return "no workers"
    return ", ".join(f"{name}: {detail}" for name, detail in outcome.succeeded.items())


def _apply(context: UpContext, node: NodePlan, action: ContainerAction) -> str:
    if action.verb is Verb.KEEP:
        return action.reason
    client = context.session.docker(node.name)
    spec = node.container
    if action.verb is Verb.REPLACE:
        remove_container(client, spec.name)
    secrets = {name: ref.resolve() for name, ref in spec.secret_files.items()}
    create_container(client, spec, secrets)
    context.changes.append(f"{node.name}: container {action.reason}")
    return action.reason
