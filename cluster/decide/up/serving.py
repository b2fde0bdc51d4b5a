"""Whether `up` asks the supervisors for vLLM (pure), or keeps what serves.

vLLM (or, with several models, the router and agents) is kept when every serving node's
supervisor runs the planned spec and no container of theirs was replaced; otherwise every rank
is asked again, together (the ranks of one model start together).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from cluster.decide.plan import ClusterPlan, NodePlan
from cluster.decide.up.outcome import Unchanged
from cluster.remote.serving.bundle import bundle_digest
from cluster.remote.serving.catalog import ServingConfig


class FoundVllm(Protocol):
    """A supervisor's report on vLLM (the node layer's `SupervisedVllm` is one)."""

    @property
    def spec_id(self) -> str | None: ...

    @property
    def restarts(self) -> int: ...

    @property
    def running(self) -> bool: ...


def spec_id(node: NodePlan, serving: ServingConfig | None = None) -> str:
    """Identifies what vLLM runs on a node: its argv and its container's spec (and, for the
    router and agents, their code and configuration)."""
    assert node.serve is not None
    routed = [bundle_digest(), serving.to_json()] if serving is not None else []
    text = json.dumps([node.container.spec_hash, node.serve.argv, *routed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def serving_of(plan: ClusterPlan, node: NodePlan) -> ServingConfig | None:
    """What the router or agent of this node runs on: the several models' config, or the one
    model's front (the head's only), or None."""
    if plan.serving is not None:
        return plan.serving
    return plan.front if node.serve is not None and node.serve.front is not None else None


def serving_nodes(plan: ClusterPlan) -> list[NodePlan]:
    return [n for n in plan.nodes if n.serve is not None]


@dataclass(frozen=True)
class Launch:
    """Ask every serving node for vLLM (`nodes`), because of `why` (one line per node)."""

    nodes: tuple[str, ...]
    why: tuple[str, ...]


def decide_launch(
    plan: ClusterPlan, found: Mapping[str, FoundVllm | None], replaced: Collection[str]
) -> Launch | Unchanged:
    """From each serving node's supervisor report (`found`, None before its first) and the
    nodes whose container this run replaced."""
    nodes = serving_nodes(plan)
    why = [reason for n in nodes if (reason := _stale(plan, n, found.get(n.name), replaced))]
    names = tuple(n.name for n in nodes)
    if why:
        return Launch(names, tuple(why))
    return Unchanged("already running with this spec on " + ", ".join(names))


def _stale(
    plan: ClusterPlan, node: NodePlan, report: FoundVllm | None, replaced: Collection[str]
) -> str | None:
    if node.name in replaced:
        return f"{node.name}: its container was created or replaced"
    if report is None:
        return f"{node.name}: its supervisor has not reported yet"
    if not report.running:
        return f"{node.name}: vLLM does not run"
    if report.spec_id != spec_id(node, serving_of(plan, node)):
        return f"{node.name}: vLLM runs another spec"
    return None


def restarts_before(found: Mapping[str, FoundVllm | None]) -> dict[str, int]:
    """Each supervisor's restart count now: a higher one later is a death during this `up`."""
    return {name: (report.restarts if report is not None else 0) for name, report in found.items()}
