"""Steps: the head's container (Ray head), then every worker's container at once.

A container that runs with the planned spec is kept. One that is stopped or missing is
(re)created; one whose spec changed is recreated only with `--recreate`, otherwise the run stops
and names the difference. On a Ray cluster, recreating the head recreates the workers too: they
joined the old Ray head.
"""

from __future__ import annotations

from cluster.decide.plan import NodePlan
from cluster.errors import VclusterError
from cluster.nodes.containers import (
    ContainerState,
    create_container,
    inspect_container,
    remove_container,
)
from cluster.steps.context import UpContext


class SpecChanged(VclusterError):
    """A running container does not match the inventory any more."""


def start_head(context: UpContext) -> str:
    head = context.require_plan().head
    return _ensure_container(context, head, force=context.recreate_all)


def start_workers(context: UpContext) -> str:
    plan = context.require_plan()
    force = (plan.ray and plan.head.name in context.recreated) or context.recreate_all
    outcome = context.session.on_each(
        lambda name: _ensure_container(context, plan.node(name), force=force),
        [w.name for w in plan.workers],
    )
    outcome.raise_if_failed("starting worker containers")
    if not plan.workers:
        return "no workers"
    details = outcome.succeeded
    return ", ".join(f"{name}: {detail}" for name, detail in details.items())


def _ensure_container(context: UpContext, node: NodePlan, *, force: bool) -> str:
    client = context.session.docker(node.name)
    spec = node.container
    state = inspect_container(client, spec.name)
    if state is not None and state.running and state.spec_hash == spec.spec_hash and not force:
        return "running, unchanged"
    if state is not None and state.running and state.spec_hash != spec.spec_hash:
        _require_recreate(context, node, state)
    reason = _reason(state, force, spec.spec_hash)
    if state is not None:
        remove_container(client, spec.name)
    secrets = {name: ref.resolve() for name, ref in spec.secret_files.items()}
    create_container(client, spec, secrets)
    context.recreated.append(node.name)
    context.changes.append(f"{node.name}: container {reason}")
    return reason


def require_unchanged_or_recreate(context: UpContext) -> None:
    """Stop now, before anything is built or copied, if a running container's spec changed and
    `--recreate` was not given (the head and worker steps would stop there anyway)."""
    plan = context.require_plan()

    def check(name: str) -> None:
        node = plan.node(name)
        state = inspect_container(context.session.docker(name), node.container.name)
        if state is not None and state.running and state.spec_hash != node.container.spec_hash:
            _require_recreate(context, node, state)

    context.session.on_each(check, [n.name for n in plan.nodes]).raise_if_failed()


def _require_recreate(context: UpContext, node: NodePlan, state: ContainerState) -> None:
    if context.options.recreate:
        return
    raise SpecChanged(
        f"container {node.container.name} runs another spec ({state.spec_hash}) than the "
        f"inventory's ({node.container.spec_hash}): the image, arguments or environment changed",
        where=node.name,
        fix="run `vcluster up --recreate` to replace it (vLLM restarts)",
    )


def _reason(state: ContainerState | None, force: bool, spec_hash: str) -> str:
    if state is None:
        return "created"
    if state.running and state.spec_hash != spec_hash:
        return "recreated (spec changed)"
    if force and state.running:
        return "recreated (the Ray head or its token was replaced)"
    if not state.running:
        return f"recreated (it was {state.status}, exit code {state.exit_code})"
    return "recreated (spec changed)"
