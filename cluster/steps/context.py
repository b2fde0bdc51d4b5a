"""What the steps of one `up` share: inventory, connections, facts, what was decided, options.

Each field has one writer, named in its docstring; the steps after Planning act on `decision`
alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.decide.inventory import Inventory
from cluster.decide.plan import ClusterPlan, NodeFacts
from cluster.decide.runtime import Runtime
from cluster.decide.up.steps import UpDecision
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


@dataclass(frozen=True)
class Launched:
    """What the launch step saw and asked for."""

    restarts: dict[str, int]
    """Each supervisor's restart count when `up` asked for vLLM: a higher one is a death."""
    launch_id: str | None
    """Names this run's request for vLLM, when it made one (None: what served was kept)."""


@dataclass
class UpContext:
    inventory: Inventory
    session: Session
    reporter: Reporter
    options: UpOptions = UpOptions()
    host_facts: dict[str, HostFacts] = field(default_factory=dict)
    """Writer: the facts step (`gather_facts`)."""
    node_facts: dict[str, NodeFacts] = field(default_factory=dict)
    """Writer: the facts step (`gather_facts`): what the plan needs of each node."""
    image_facts: ImageFacts | None = None
    """Writer: `learn_runtime` (at preflight, or at the Image facts step when the image was on
    no node then)."""
    runtime: Runtime | None = None
    """The image the containers run, Ray or not, vLLM's executor: chosen on the image facts.
    Writer: `learn_runtime`, once."""
    image_error: VclusterError | None = None
    """Why the image's facts could not be had (a probe that failed), for the checks to say.
    Writer: `learn_runtime`."""
    decision: UpDecision | None = None
    """The plan and every action decided before the first change. Writer: the Planning step."""
    launched: Launched | None = None
    """Writer: the launch step."""
    changes: list[str] = field(default_factory=list)
    """A journal, appended to by each step that changed something (its own lines only)."""

    def require_decision(self) -> UpDecision:
        assert self.decision is not None, "the Planning step runs before this one"
        return self.decision

    def require_plan(self) -> ClusterPlan:
        return self.require_decision().plan
