"""Which steps of `up` run, and everything `up` decides before the first one acts (pure).

The Planning step reads what the decisions need (each node's container, whether the token
files exist, the last collective check) and calls `decide_up`; what it returns is all that the
later steps act on. A step that has nothing to do is still listed, with why (its status line),
so `up` reads the same on every cluster.

The image's facts (Ray or not, vLLM's version) decide the runtime, and the runtime the plan.
They need the image on a node: when no node has it when `up` starts, the firewall, the image
and the model files (which need no plan) come first, and Planning follows the image's facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from cluster.decide.inventory import Inventory
from cluster.decide.plan import ClusterPlan
from cluster.decide.runtime import Runtime
from cluster.decide.state_paths import agent_token_path, generated_ray_token_path
from cluster.decide.up.containers import ContainerAction, FoundContainer, decide_containers
from cluster.decide.up.images import RayImageNeeded, decide_ray_image
from cluster.decide.up.models import decide_model_files
from cluster.decide.up.outcome import Unchanged
from cluster.decide.up.tokens import MakeToken, decide_agent_token, decide_ray_token

NO_RAY = "not applicable: no Ray cluster"


class StepName(Enum):
    """The steps of `up` after the facts and the preflight checks; the value is the title."""

    FIREWALL = "Firewall on every node"
    IMAGE = "Image on every node"
    MODEL_FILES = "Model files on every node"
    IMAGE_FACTS = "Image facts"
    PLANNING = "Planning"
    RAY_IMAGE = "Ray-ready image"
    RAY_TOKEN = "Ray token"  # noqa: S105 (a title)
    AGENT_TOKEN = "Agent token"  # noqa: S105 (a title)
    HEAD = "Head container and Ray head"
    RAY_HEAD = "Waiting for the Ray head"
    WORKERS = "Worker containers"
    RAY_NODES = "Waiting for every node in Ray"
    TOPOLOGY = "Topology"
    COLLECTIVE = "Collective check"
    LAUNCH = "Launching vLLM"
    SERVE = "Waiting for vLLM to serve"


@dataclass(frozen=True)
class PlannedStep:
    name: StepName
    skip: str | None = None
    """Why it does not run, shown as its status line; None: it runs."""


@dataclass(frozen=True)
class UpFacts:
    """What the Planning step reads for the decisions, beyond the plan's own facts."""

    containers: Mapping[str, FoundContainer | None]
    """What runs under the cluster's container name on each node (None: nothing)."""
    ray_token_exists: bool
    agent_token_exists: bool
    collective_last_ok: bool | None
    """Whether the last collective check this controller kept passed (None: none kept)."""


@dataclass(frozen=True)
class UpDecision:
    """Everything `up` decided before its first change."""

    plan: ClusterPlan
    containers: Mapping[str, ContainerAction]
    """Each node's container action, the head first."""
    ray_token: MakeToken | Unchanged | None
    """None: no Ray cluster."""
    agent_token: MakeToken | Unchanged | None
    """None: one model."""
    ray_image: RayImageNeeded | Unchanged
    steps: tuple[PlannedStep, ...]
    """The steps after Planning, in order."""

    @property
    def replaced(self) -> frozenset[str]:
        """The nodes whose container this run creates or replaces (vLLM restarts there)."""
        return frozenset(name for name, action in self.containers.items() if action.acts)


def before_image_facts(inventory: Inventory) -> list[PlannedStep]:
    """The steps that need no runtime, up to the image's facts."""
    models = decide_model_files(inventory)
    return [
        PlannedStep(StepName.FIREWALL),
        PlannedStep(StepName.IMAGE),
        PlannedStep(
            StepName.MODEL_FILES, models.because if isinstance(models, Unchanged) else None
        ),
        PlannedStep(StepName.IMAGE_FACTS),
    ]


def steps_before_planning(inventory: Inventory, *, image_known: bool) -> list[PlannedStep]:
    """What runs before Planning: nothing when the image's facts are known (a node had the
    image at preflight); else the steps that bring the image and learn its facts."""
    return [] if image_known else before_image_facts(inventory)


def decide_collective(in_up: bool, replaced: bool, last_ok: bool | None) -> str | None:
    """Why `up` does not run the collective check (None: it runs it)."""
    if not in_up:
        return "not asked for (collective.in_up: false; `vcluster check --collective` runs it)"
    if not replaced and last_ok is not False:
        # vLLM may be serving in them: it holds the GPUs' memory
        return "containers unchanged, vLLM may be serving: `vcluster check --collective` runs it"
    return None


def decide_up(
    inventory: Inventory,
    plan: ClusterPlan,
    runtime: Runtime,
    facts: UpFacts,
    *,
    recreate: bool,
    image_known: bool,
) -> UpDecision:
    """Every decision of `up` that its facts allow before anything changes, and the steps
    that follow Planning (`image_known`: the image's facts were known before Planning, so the
    firewall, image and model files steps come after it)."""
    head_found = facts.containers.get(plan.head.name)
    ray_token = None
    if plan.ray:
        given = None if inventory.ray_token_is_generated else str(inventory.ray_token)
        ray_token = decide_ray_token(
            given,
            generated_ray_token_path(inventory.cluster),
            exists=facts.ray_token_exists,
            head=plan.head,
            head_found=head_found,
            recreate=recreate,
        )
    agent_token = None
    if plan.routed:
        agent_token = decide_agent_token(
            agent_token_path(inventory.cluster),
            exists=facts.agent_token_exists,
            head_found=head_found,
        )
    renew = any(isinstance(t, MakeToken) and t.renews for t in (ray_token, agent_token))
    containers = decide_containers(plan, facts.containers, recreate=recreate, renew=renew)
    head_acts = containers[plan.head.name].acts
    ray_image = decide_ray_image(inventory.image, runtime)
    no_ray = None if plan.ray else NO_RAY
    collective = decide_collective(
        inventory.collective.in_up,
        any(a.acts for a in containers.values()),
        facts.collective_last_ok,
    )
    steps = [
        *([] if not image_known else before_image_facts(inventory)),
        PlannedStep(
            StepName.RAY_IMAGE, ray_image.because if isinstance(ray_image, Unchanged) else None
        ),
        PlannedStep(StepName.RAY_TOKEN, no_ray),
        PlannedStep(
            StepName.AGENT_TOKEN,
            None
            if plan.routed
            else "not applicable: one model (the router in front of it starts no ranks)",
        ),
        PlannedStep(StepName.HEAD),
        PlannedStep(
            StepName.RAY_HEAD,
            no_ray or (None if head_acts else "unchanged (checked with every node next)"),
        ),
        PlannedStep(StepName.WORKERS),
        PlannedStep(StepName.RAY_NODES, no_ray),
        PlannedStep(StepName.TOPOLOGY, no_ray),
        PlannedStep(StepName.COLLECTIVE, collective),
        PlannedStep(StepName.LAUNCH),
        PlannedStep(StepName.SERVE),
    ]
    return UpDecision(plan, containers, ray_token, agent_token, ray_image, tuple(steps))
