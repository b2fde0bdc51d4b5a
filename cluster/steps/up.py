"""`vcluster up`: the steps in order, under the cluster's lock."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from cluster.decide.checks import CheckResult, Status
from cluster.decide.collective_report import CollectiveRun
from cluster.decide.inventory import Inventory
from cluster.decide.plan import ClusterPlan, build_plan
from cluster.decide.runtime import assumed_runtime
from cluster.errors import VclusterError
from cluster.nodes.lock import ClusterLock
from cluster.nodes.preflight import port_results
from cluster.nodes.session import Session
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


def _plan(context: UpContext) -> str:
    context.plan = build_plan(context.inventory, context.node_facts, context.runtime)
    plan = context.plan
    ray = "" if plan.ray else ", no Ray cluster"
    return (
        f"TP {plan.tensor_parallel} x PP {plan.pipeline_parallel}, executor {plan.executor}"
        f"{ray}, head {plan.head.name}"
    )


def _with_ray(run: Callable[[UpContext], str]) -> Callable[[UpContext], str]:
    """A Ray step that says `not applicable` on a cluster without Ray."""

    @functools.wraps(run)
    def step(context: UpContext) -> str:
        if not context.require_plan().ray:
            return "not applicable: no Ray cluster"
        return run(context)

    return step


STEPS_BEFORE_LOCK: list[Step[UpContext]] = [
    Step("Connecting to the hosts", connect_to_hosts),
]
STEPS: list[Step[UpContext]] = [
    Step("Gathering facts", gather_facts),
    Step("Preflight checks", run_preflight),
    Step("Planning", _plan),
    Step("Firewall on every node", install_firewall),
    Step("Image on every node", ensure_image),
    Step("Model files on every node", model_files_step),
    Step("Image facts", learn_image),
    Step("Ray-ready image", ensure_ray_image),
    Step("Ray token", _with_ray(ensure_ray_token)),
    Step("Agent token", ensure_agent_token),
    Step("Head container and Ray head", start_head),
    Step("Waiting for the Ray head", _with_ray(wait_for_ray_head)),
    Step("Worker containers", start_workers),
    Step("Waiting for every node in Ray", _with_ray(wait_for_ray_nodes)),
    Step("Topology", _with_ray(check_ray_topology)),
    Step("Collective check", collective_step),
    Step("Launching vLLM", launch_vllm),
    Step("Waiting for vLLM to serve", wait_for_vllm),
]


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
        run_steps([STEPS[0]], context, reporter)
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
            plan = build_plan(context.inventory, context.node_facts, context.runtime)
            # one check at a time, and not while `up` or `down` changes the cluster
            with ClusterLock(context.session.ssh(head), context.inventory.cluster, "check"):
                outcome = run_collective(
                    context.inventory, context.session, plan, context.host_facts
                )
        except VclusterError as error:  # a node unreachable, GPU counts that differ, a lock
            row = CheckResult("collective", Status.FAIL, f"not run: {error.message}",
                              error.where, error.fix)  # fmt: skip
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
    with Session(inventory) as session:
        context = UpContext(inventory, session, reporter)
        image_facts = Step("Image facts", _image_facts_if_present)
        steps = [*STEPS_BEFORE_LOCK, STEPS[0], image_facts, Step("Planning", _plan)]
        run_steps(steps, context, reporter)
        return context.require_plan()


def _image_facts_if_present(context: UpContext) -> str:
    learn_runtime(context)
    if context.image_error is not None:
        raise context.image_error
    if context.image_facts is None or context.runtime is None:
        context.runtime = assumed_runtime(context.inventory, "the image is on no node yet")
        return f"{context.inventory.image} is on no node yet: the plan takes it to have Ray"
    return f"{context.image_facts.summary()}; {context.runtime.reason}"


def up(inventory: Inventory, reporter: Reporter, options: UpOptions | None = None) -> UpResult:
    """Bring the cluster to the inventory's state; changes nothing that already matches it."""
    with Session(inventory) as session:
        context = UpContext(inventory, session, reporter, options or UpOptions())
        run_steps(STEPS_BEFORE_LOCK, context, reporter)
        with ClusterLock(session.ssh(inventory.head.node_name), inventory.cluster, "up"):
            run_steps(STEPS, context, reporter)
        plan = context.require_plan()
        return UpResult(
            endpoint=plan.endpoint,
            served_model_name=plan.served_model_name,
            changes=tuple(context.changes),
            api_key_required=inventory.secrets.api_key is not None,
        )
