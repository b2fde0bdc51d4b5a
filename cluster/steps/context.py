"""What the steps of one `up` or `down` share: inventory, connections, facts, plan, options."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.decide.inventory import Inventory
from cluster.decide.plan import ClusterPlan, NodeFacts
from cluster.decide.runtime import Runtime
from cluster.errors import VclusterError
from cluster.facts.host import HostFacts
from cluster.facts.image import ImageFacts
from cluster.nodes.session import Session
from cluster.steps.base import Reporter

DEFAULT_RAY_TIMEOUT_S = 180.0
DEFAULT_READY_TIMEOUT_S = 900.0
"""Real models take minutes to load; `--wait` overrides it."""


@dataclass(frozen=True)
class UpOptions:
    recreate: bool = False
    ray_timeout_s: float = DEFAULT_RAY_TIMEOUT_S
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    derive_ray_image: bool = True
    """Derive a Ray-ready image when the inventory's has no Ray (else: vLLM's own mode)."""


@dataclass
class UpContext:
    inventory: Inventory
    session: Session
    reporter: Reporter
    options: UpOptions = UpOptions()
    host_facts: dict[str, HostFacts] = field(default_factory=dict)
    node_facts: dict[str, NodeFacts] = field(default_factory=dict)
    image_facts: ImageFacts | None = None
    runtime: Runtime | None = None
    """The image the containers run, Ray or not, vLLM's executor: chosen on the image facts."""
    image_error: VclusterError | None = None
    """Why the image's facts could not be had (a probe that failed), for the checks to say."""
    plan: ClusterPlan | None = None
    image_ids: dict[str, str] = field(default_factory=dict)
    recreated: list[str] = field(default_factory=list)
    """Nodes whose container was (re)created in this run: vLLM must restart on them."""
    recreate_all: bool = False
    """Replace every container even if it matches its spec (e.g. a new Ray token)."""
    serving_unchanged: bool = False
    launch_id: str | None = None
    """Names this run's request for vLLM, when it made one."""
    restarts_at_launch: dict[str, int] = field(default_factory=dict)
    """Each supervisor's restart count when `up` asked for vLLM: a higher one is a death."""
    changes: list[str] = field(default_factory=list)

    def require_plan(self) -> ClusterPlan:
        assert self.plan is not None, "the plan step runs before this one"
        return self.plan
