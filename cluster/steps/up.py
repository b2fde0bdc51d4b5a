"""`vcluster up`: the steps in order, under the cluster's lock.

Facts first (the hosts, the preflight checks, the image's facts where a node has the image),
then Planning decides the plan and every action (cluster/decide/up/), and the list of the steps
that follow; each of those does what was decided. When no node has the image yet, its facts
need it on a node: the firewall, image and model files steps (which need no plan) run before
Planning, and Planning follows the image's facts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.decide.checks import CheckResult, Status
from cluster.decide.collective_report import CollectiveRun
from cluster.decide.inventory import Inventory
from cluster.decide.manifest import source_weights_bytes
from cluster.decide.plan import ClusterPlan, build_plan, container_name
from cluster.decide.runtime import Runtime, assumed_runtime
from cluster.decide.state_paths import agent_token_path, generated_ray_token_path
from cluster.decide.up.steps import (
    PlannedStep,
    StepName,
    UpFacts,
    decide_up,
    steps_before_planning,
)
from cluster.errors import VclusterError
from cluster.nodes.containers import inspect_container
from cluster.nodes.lock import ClusterLock
from cluster.nodes.preflight import port_results
from cluster.nodes.session import Session
from cluster.report.collective_store import load_last_run
from cluster.steps.agent_token import ensure_agent_token
from cluster.steps.base import Reporter, Step, run_steps
from cluster.steps.collective import CollectiveOutcome, collective_step, run_collective
from cluster.steps.connect import connect_to_hosts
from cluster.steps.containers import start_head, start_workers
from cluster.steps.context import UpContext, UpOptions
from cluster.steps.facts import gather_facts
from cluster.steps.firewall import firewall_results, install_firewall
from cluster.steps.image import ensure_image
from cluster.steps.image_facts import learn_image, learn_runtime
from cluster.steps.model_files import model_files_step
from cluster.steps.preflight import context_preflight_results, run_preflight
from cluster.steps.ray_cluster import check_ray_topology, wait_for_ray_head, wait_for_ray_nodes
from cluster.steps.ray_image import ensure_ray_image
from cluster.steps.ray_token import ensure_ray_token
from cluster.steps.serve import launch_vllm, wait_for_vllm


def plan_line(plan: ClusterPlan) -> str:
    ray = "" if plan.ray else ", no Ray cluster"
    return (
        f"TP {plan.tensor_parallel} x PP {plan.pipeline_parallel}, executor {plan.executor}"
        f"{ray}, head {plan.head.name}"
    )


def plan_on_facts(context: UpContext, runtime: Runtime | None) -> ClusterPlan:
    """The plan on the nodes' facts, the runtime and the models' weights on this machine."""
    return build_plan(
        context.inventory,
        context.node_facts,
        runtime,
        weights_bytes=source_weights_bytes(context.inventory),
    )


def planning(context: UpContext, *, image_known: bool) -> str:
    """The step: the plan on the runtime, what runs on each node now and the token files (the
    facts), then every decision and the steps that follow (`decide_up`)."""
    inventory, session = context.inventory, context.session
    runtime = context.runtime
    if runtime is None:
        raise VclusterError(
            f"the runtime of {inventory.image} was not decided before Planning",
            fix="run `vcluster up` again; if it repeats, check `docker images` on the head",
        )
    plan = plan_on_facts(context, runtime)
    name = container_name(inventory.cluster)
    found = session.on_each(
        lambda node: inspect_container(session.docker(node), name), [n.name for n in plan.nodes]
    )
    found.raise_if_failed("reading the containers")
    last = load_last_run(inventory.cluster)
    facts = UpFacts(
        containers=found.succeeded,
        ray_token_exists=generated_ray_token_path(inventory.cluster).exists(),
        agent_token_exists=agent_token_path(inventory.cluster).exists(),
        collective_last_ok=None if last is None else bool(last.get("ok")),
    )
    context.decision = decide_up(
        inventory, plan, runtime, facts, recreate=context.options.recreate, image_known=image_known
    )
    return plan_line(plan)


APPLY: dict[StepName, Callable[[UpContext], str]] = {
    StepName.FIREWALL: install_firewall,
    StepName.IMAGE: ensure_image,
    StepName.MODEL_FILES: model_files_step,
    StepName.IMAGE_FACTS: learn_image,
    StepName.RAY_IMAGE: ensure_ray_image,
    StepName.RAY_TOKEN: ensure_ray_token,
    StepName.AGENT_TOKEN: ensure_agent_token,
    StepName.HEAD: start_head,
    StepName.RAY_HEAD: wait_for_ray_head,
    StepName.WORKERS: start_workers,
    StepName.RAY_NODES: wait_for_ray_nodes,
    StepName.TOPOLOGY: check_ray_topology,
    StepName.COLLECTIVE: collective_step,
    StepName.LAUNCH: launch_vllm,
    StepName.SERVE: wait_for_vllm,
}
"""What each planned step runs (Planning is run by `up` itself)."""


def _skipped(why: str) -> Callable[[UpContext], str]:
    return lambda context: why


def as_steps(planned: Sequence[PlannedStep]) -> list[Step[UpContext]]:
    """The planned steps to run; one that does not run says why on its status line."""
    return [
        Step(p.name.value, APPLY[p.name] if p.skip is None else _skipped(p.skip)) for p in planned
    ]


STEPS_BEFORE_LOCK: list[Step[UpContext]] = [
    Step("Connecting to the hosts", connect_to_hosts),
]
FACT_STEPS: list[Step[UpContext]] = [
    Step("Gathering facts", gather_facts),
    Step("Preflight checks", run_preflight),
]
"""What every `up` reads and checks first; the preflight learns the image's facts and the
runtime when a node has the image."""


@dataclass(frozen=True)
class UpResult:
    endpoint: str
    served_model_name: str
    changes: tuple[str, ...]
    api_key_required: bool


@dataclass(frozen=True)
class CheckReport:
    results: list[CheckResult]
    collective: CollectiveOutcome | None = None


def gather_checks(
    inventory: Inventory, reporter: Reporter, *, collective: bool = False
) -> CheckReport:
    """Every preflight result, reaching what can be reached; changes nothing. With
    `collective`, also the all-reduce check in the cluster's running containers."""
    with Session(inventory) as session:
        context = UpContext(inventory, session, reporter)
        run_steps([Step("Connecting to the hosts", _connect_reachable)], context, reporter)
        run_steps(FACT_STEPS[:1], context, reporter)
        results = context_preflight_results(context)
        results += port_results(inventory, session)
        results += firewall_results(inventory, session, context.host_facts)
        if not collective:
            return CheckReport(results)
        outcome = _collective(context)
        return CheckReport(results + outcome.results, outcome)


def _collective(context: UpContext) -> CollectiveOutcome:
    """The collective check as a step of `check`, on the plan of what runs."""
    found: list[CollectiveOutcome] = []

    def step(context: UpContext) -> str:
        head = context.inventory.head.node_name
        try:
            plan = plan_on_facts(context, context.runtime)
            # one check at a time, and not while `up` or `down` changes the cluster
            with ClusterLock(context.session.ssh(head), context.inventory.cluster, "check"):
                outcome = run_collective(
                    context.inventory, context.session, plan, context.host_facts
                )
        except VclusterError as error:  # a node unreachable, GPU counts that differ, a lock
            row = CheckResult(
                "collective", Status.FAIL, f"not run: {error.message}", error.where, error.fix
            )
            outcome = CollectiveOutcome(CollectiveRun(), [row], 0.0)
        found.append(outcome)
        return f"{len(outcome.run.measurements)} measurement(s) in {outcome.seconds:.0f} s"

    run_steps([Step("Collective check", step)], context, context.reporter)
    return found[0]


def _connect_reachable(context: UpContext) -> str:
    outcome = context.session.open()
    unreachable = f"; unreachable: {', '.join(outcome.failed)}" if outcome.failed else ""
    return f"{len(outcome.succeeded)} of {len(context.inventory.nodes)} host(s){unreachable}"


def live_plan(inventory: Inventory, reporter: Reporter) -> ClusterPlan:
    """The plan from the hosts' real facts (what `up` would do), without changing anything."""
    planned: list[ClusterPlan] = []

    def plan_step(context: UpContext) -> str:
        why = "the image is on no node yet"
        runtime = context.runtime or assumed_runtime(context.inventory, why)
        planned.append(plan_on_facts(context, runtime))
        return plan_line(planned[0])

    with Session(inventory) as session:
        context = UpContext(inventory, session, reporter)
        image_facts = Step("Image facts", _image_facts_if_present)
        steps = [*STEPS_BEFORE_LOCK, FACT_STEPS[0], image_facts, Step("Planning", plan_step)]
        run_steps(steps, context, reporter)
        return planned[0]


def _image_facts_if_present(context: UpContext) -> str:
    learn_runtime(context)
    if context.image_error is not None:
        raise context.image_error
    if context.image_facts is None or context.runtime is None:
        return f"{context.inventory.image} is on no node yet: the plan takes it to have Ray"
    return f"{context.image_facts.summary()}; {context.runtime.reason}"


def up(inventory: Inventory, reporter: Reporter, options: UpOptions | None = None) -> UpResult:
    """Bring the cluster to the inventory's state; changes nothing that already matches it."""
    with Session(inventory) as session:
        context = UpContext(inventory, session, reporter, options or UpOptions())
        run_steps(STEPS_BEFORE_LOCK, context, reporter)
        with ClusterLock(session.ssh(inventory.head.node_name), inventory.cluster, "up"):
            run_steps(FACT_STEPS, context, reporter)
            known = context.runtime is not None
            first = as_steps(steps_before_planning(inventory, image_known=known))
            decide = Step(StepName.PLANNING.value, functools.partial(planning, image_known=known))
            run_steps([*first, decide], context, reporter)
            run_steps(as_steps(context.require_decision().steps), context, reporter)
        plan = context.require_plan()
        return UpResult(
            endpoint=plan.endpoint,
            served_model_name=plan.served_model_name,
            changes=tuple(context.changes),
            api_key_required=inventory.secrets.api_key is not None,
        )
