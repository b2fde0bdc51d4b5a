"""Create, replace or keep each node's container (pure), from what runs there and the plan.

A container that runs with the planned spec is kept. One that is missing is created; one that
is stopped is replaced; one whose spec changed is replaced only when `--recreate` was given,
otherwise `up` stops before it changes anything and names the difference. A new token replaces
every container (they all hold the old one); on a Ray cluster a new head replaces the workers
too (they joined the old Ray head).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from cluster.decide.plan import ClusterPlan, NodePlan
from cluster.errors import VclusterError

RENEWED = "recreated (the Ray head or its token was replaced)"


class FoundContainer(Protocol):
    """What runs under the cluster's container name on a node (the node layer's
    `ContainerState` is one)."""

    @property
    def status(self) -> str: ...

    @property
    def spec_hash(self) -> str | None: ...

    @property
    def exit_code(self) -> int: ...

    @property
    def running(self) -> bool: ...


class SpecChanged(VclusterError):
    """A running container does not match the inventory any more."""


class Verb(Enum):
    CREATE = "create"
    REPLACE = "replace"
    KEEP = "keep"


@dataclass(frozen=True)
class ContainerAction:
    """What happens to one node's container; `reason` is its status line (and, when it acts,
    its line under `changed:`)."""

    node: str
    verb: Verb
    reason: str

    @property
    def acts(self) -> bool:
        return self.verb is not Verb.KEEP


def spec_differs(node: NodePlan, found: FoundContainer | None) -> bool:
    """A container runs there, with another spec than the plan's."""
    return found is not None and found.running and found.spec_hash != node.container.spec_hash


def require_unchanged_or_recreate(
    plan: ClusterPlan, found: Mapping[str, FoundContainer | None], *, recreate: bool
) -> None:
    """Raise naming every node whose running container has another spec, unless `recreate`."""
    changed = [n for n in plan.nodes if spec_differs(n, found.get(n.name))]
    if not changed or recreate:
        return
    raise SpecChanged(
        "; ".join(
            f"container {n.container.name} runs another spec ({_hash(found.get(n.name))}) than "
            f"the inventory's ({n.container.spec_hash}): the image, arguments or environment "
            "changed"
            for n in changed
        ),
        where=", ".join(n.name for n in changed),
        fix="run `vcluster up --recreate` to replace it (vLLM restarts)",
    )


def _hash(found: FoundContainer | None) -> str | None:
    return found.spec_hash if found is not None else None


def decide_containers(
    plan: ClusterPlan,
    found: Mapping[str, FoundContainer | None],
    *,
    recreate: bool,
    renew: bool = False,
) -> dict[str, ContainerAction]:
    """Each node's container action, the head first. `found[node]` is what runs there (None:
    no container); `renew`: a new token, so every container is replaced even if it matches."""
    require_unchanged_or_recreate(plan, found, recreate=recreate)
    head = _action(plan.head, found.get(plan.head.name), force=renew)
    force_workers = renew or (plan.ray and head.acts)
    actions = {head.node: head}
    for worker in plan.workers:
        actions[worker.name] = _action(worker, found.get(worker.name), force=force_workers)
    return actions


def _action(node: NodePlan, found: FoundContainer | None, *, force: bool) -> ContainerAction:
    if found is None:
        return ContainerAction(node.name, Verb.CREATE, "created")
    if not found.running:
        reason = f"recreated (it was {found.status}, exit code {found.exit_code})"
        return ContainerAction(node.name, Verb.REPLACE, reason)
    if found.spec_hash != node.container.spec_hash:
        return ContainerAction(node.name, Verb.REPLACE, "recreated (spec changed)")
    if force:
        return ContainerAction(node.name, Verb.REPLACE, RENEWED)
    return ContainerAction(node.name, Verb.KEEP, "running, unchanged")
