"""Steps: ask for `vllm serve` (the head, or every node with `executor: mp`), wait until it serves.

Each container's supervisor runs vLLM while its `serve.json` asks for it, and restarts it when
it dies. A vLLM already running the same spec in unchanged containers is kept; otherwise the new
spec is written on every node at once (the ranks of one model start together): decided by
cluster/decide/up/serving.py from the supervisors' reports. A vLLM that dies while `up` waits
for it is stopped everywhere, and `up` says why.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from cluster.decide.plan import NodePlan
from cluster.decide.up.outcome import Unchanged
from cluster.decide.up.serving import (
    decide_launch,
    restarts_before,
    serving_nodes,
    serving_of,
    spec_id,
)
from cluster.errors import VclusterError
from cluster.nodes.vllm import (
    SupervisedVllm,
    http_get,
    log_tail_argv,
    parse_supervisor_state,
    request_serve_argv,
    request_stop_argv,
    served_models,
    supervisor_state_argv,
)
from cluster.remote.serving.catalog import ServingConfig
from cluster.remote.serving.failures import error_lines, likely_cause
from cluster.steps.base import wait_until
from cluster.steps.context import Launched, UpContext
from cluster.steps.router import put_serving_files, wait_for_router

POLL_INTERVAL_S = 2.0
LAUNCH_TIMEOUT_S = 30.0
"""How long a supervisor may take to start vLLM once asked (it checks every second)."""
LOG_LINES = 15


class VllmFailed(VclusterError):
    """vLLM exited or did not become ready."""


def _exec(context: UpContext, node: NodePlan, argv: list[str], detach: bool = False) -> Any:
    """`docker exec` in the node's container: docker-py's ExecResult (it has no type hints)."""
    container = context.session.docker(node.name).containers.get(node.container.name)
    return container.exec_run(argv, detach=detach)


def supervised(context: UpContext, node: NodePlan) -> SupervisedVllm | None:
    """The node's supervisor's report on vLLM, or None before its first report."""
    result = _exec(context, node, supervisor_state_argv(node.container.supervisor.state_dir))
    if result.exit_code != 0:
        return None
    return parse_supervisor_state(result.output.decode(errors="replace"))


def launch_vllm(context: UpContext) -> str:
    decision = context.require_decision()
    plan = decision.plan
    names = [n.name for n in serving_nodes(context.require_plan())]
    reports = context.session.on_each(lambda name: supervised(context, _node(context, name)), names)
    reports.raise_if_failed("asking the supervisors about vLLM")
    found = reports.succeeded
    decided = decide_launch(plan, found, decision.replaced)
    # A restart counted after this point is a death during this `up`; earlier ones are history.
    restarts = restarts_before(found)
    if isinstance(decided, Unchanged):
        context.launched = Launched(restarts, None)
        return decided.because
    context.launched = Launched(restarts, uuid.uuid4().hex[:12])  # every rank restarts, together
    context.session.on_each(
        lambda name: _request(context, _node(context, name)), list(decided.nodes)
    ).raise_if_failed("asking the supervisors for vLLM")
    why = "; ".join(decided.why)
    if plan.serving is not None:
        context.changes.append("router and agents (re)started")
        return f"router on {plan.head.name}, model agents on {', '.join(names)} ({why})"
    context.changes.append("vLLM (re)started")
    return (
        f"vllm serve on {', '.join(names)}: TP {plan.tensor_parallel} x PP "
        f"{plan.pipeline_parallel}, executor {plan.executor}; restarted by its supervisor if it "
        f"dies ({why})"
    )


def _request(context: UpContext, node: NodePlan) -> None:
    """Write the node's serve request and wait until its supervisor runs that spec."""
    assert node.serve is not None
    assert context.launched is not None and context.launched.launch_id is not None
    launch_id = context.launched.launch_id
    state_dir = node.container.supervisor.state_dir
    serving = _serving_of(context, node)
    if serving is not None:
        container = context.session.docker(node.name).containers.get(node.container.name)
        put_serving_files(container, serving)
    argv = request_serve_argv(state_dir, node.serve, spec_id(node, serving), launch_id)
    result = _exec(context, node, argv)
    if result.exit_code != 0:
        raise VllmFailed(
            f"could not ask the supervisor for vLLM: {result.output.decode(errors='replace')}",
            where=node.name,
            fix="run `vcluster up --recreate` (the container may predate the supervisor)",
        )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while True:
        report = supervised(context, node)
        if _runs_this_request(context, node, report):
            return
        _raise_if_died(context, node, report)
        if time.monotonic() > deadline:
            raise VllmFailed(
                f"the supervisor did not start vLLM within {LAUNCH_TIMEOUT_S:g}s "
                f"(it reports: {report.state if report else 'nothing'})",
                where=node.name,
                fix="read `vcluster logs --component container` on this node",
            )
        time.sleep(0.5)


def stop_vllm_everywhere(context: UpContext) -> None:
    """Ask every serving node's supervisor to stop vLLM (and not to restart it)."""

    def stop(name: str) -> None:
        node = _node(context, name)
        _exec(context, node, request_stop_argv(node.container.supervisor.state_dir))

    context.session.on_each(stop, [n.name for n in serving_nodes(context.require_plan())])


def _serving_of(context: UpContext, node: NodePlan) -> ServingConfig | None:
    return serving_of(context.require_plan(), node)


def _node(context: UpContext, name: str) -> NodePlan:
    return context.require_plan().node(name)


def wait_for_vllm(context: UpContext) -> str:
    plan = context.require_plan()
    if plan.serving is not None:
        return wait_for_router(context)
    head = plan.head
    api_key = context.inventory.secrets.api_key
    key = api_key.resolve() if api_key is not None else None
    port = context.inventory.ports.vllm

    def missing() -> str | None:
        for node in serving_nodes(context.require_plan()):
            _raise_if_died(context, node, supervised(context, node))
        try:
            health = http_get(context.session.ssh(head.name), head.facts.address, port, "/health")
            if health.status != 200:
                return f"/health answers {health.status}"
            models = http_get(
                context.session.ssh(head.name), head.facts.address, port, "/v1/models", api_key=key
            )
        except OSError:
            return "vLLM not listening yet (loading the model)"
        if models.status != 200:
            return f"/v1/models answers {models.status}"
        return None if plan.served_model_name in served_models(models.body) else "model not listed"

    still = wait_until(
        missing,
        timeout_s=context.options.ready_timeout_s,
        interval_s=POLL_INTERVAL_S,
        reporter=context.reporter,
        waiting_for="vLLM",
    )
    if still is not None:
        tail = _log_tail(context, head)
        raise VllmFailed(
            f"vLLM was not ready within {context.options.ready_timeout_s:g}s ({still}); "
            f"last log lines: {tail}",
            where=head.name,
            fix="large models take long: raise --wait; see `vcluster logs --component vllm`",
        )
    return f"{plan.served_model_name!r} served at {plan.endpoint}"


def _runs_this_request(context: UpContext, node: NodePlan, report: SupervisedVllm | None) -> bool:
    """The supervisor's report says vLLM runs the planned spec, from this `up`'s request."""
    serving = _serving_of(context, node)
    if report is None or not report.running or report.spec_id != spec_id(node, serving):
        return False
    launch_id = context.launched.launch_id if context.launched is not None else None
    return launch_id is None or report.launch == launch_id


def _raise_if_died(context: UpContext, node: NodePlan, report: SupervisedVllm | None) -> None:
    """Stop vLLM everywhere and raise why, if `node`'s report counts a death since `up` asked."""
    before = context.launched.restarts.get(node.name, 0) if context.launched is not None else 0
    if report is not None and report.restarts > before:
        stop_vllm_everywhere(context)
        raise _died(context, node, report.last_exit_cause)


def _log_tail(context: UpContext, node: NodePlan) -> str:
    assert node.serve is not None
    output = _exec(context, node, log_tail_argv(node.serve, LOG_LINES)).output
    return " | ".join(output.decode(errors="replace").strip().splitlines()) or "(empty)"


def _died(context: UpContext, node: NodePlan, how: str | None) -> VllmFailed:
    assert node.serve is not None
    full = _exec(context, node, log_tail_argv(node.serve, 200)).output.decode(errors="replace")
    cause = likely_cause(full)
    errors = " | ".join(error_lines(full)) or " | ".join(full.strip().splitlines()[-3:])
    summary = f"likely cause: {cause.summary}; " if cause else ""
    return VllmFailed(
        f"vLLM exited during start-up ({how or 'ended'}; {summary}errors: "
        f"{errors or '(empty log)'}); stopped on every node",
        where=node.name,
        fix=cause.fix if cause else "read the log with `vcluster logs --component vllm`",
    )
