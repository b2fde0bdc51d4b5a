"""Steps: launch `vllm serve` (the head, or every node with `executor: mp`), wait until it serves.

vLLM runs detached inside the node's container with its output in a log. A vLLM already
running the same spec in unchanged containers is kept; otherwise it is restarted everywhere at
once (the ranks of one model must start together).
"""

from __future__ import annotations

import hashlib
import json
import time

from cluster.errors import VclusterError
from cluster.plan import NodePlan
from cluster.steps.base import wait_until
from cluster.steps.context import UpContext
from cluster.vllm import (
    error_lines,
    http_get,
    launch_argv,
    likely_cause,
    log_tail_argv,
    running_spec_argv,
    served_models,
    stop_argv,
)

POLL_INTERVAL_S = 2.0
LAUNCH_TIMEOUT_S = 10.0
LOG_LINES = 15


class VllmFailed(VclusterError):
    """vLLM exited or did not become ready."""


def spec_id(node: NodePlan) -> str:
    """Identifies what vLLM runs on a node: its argv and its container's spec."""
    assert node.serve is not None
    text = json.dumps([node.container.spec_hash, node.serve.argv])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def serving_nodes(context: UpContext) -> list[NodePlan]:
    return [n for n in context.require_plan().nodes if n.serve is not None]


def _exec(context: UpContext, node: NodePlan, argv: list[str], detach: bool = False):
    container = context.session.docker(node.name).containers.get(node.container.name)
    return container.exec_run(argv, detach=detach)


def launch_vllm(context: UpContext) -> str:
    nodes = serving_nodes(context)
    running = context.session.on_each(
        lambda name: _exec(context, _node(context, name), running_spec_argv()),
        [n.name for n in nodes],
    ).values()
    unchanged = all(
        r.exit_code == 0 and r.output.decode().strip() == spec_id(n)
        for r, n in zip(running, nodes, strict=True)
    ) and not any(n.name in context.recreated for n in nodes)
    if unchanged:
        context.serving_unchanged = True
        return "already running with this spec on " + ", ".join(n.name for n in nodes)
    names = [n.name for n in nodes]
    context.session.on_each(
        lambda name: _exec(context, _node(context, name), stop_argv()), names
    ).raise_if_failed("stopping the old vLLM")
    context.session.on_each(
        lambda name: _launch(context, _node(context, name)), names
    ).raise_if_failed("launching vLLM")
    context.changes.append("vLLM (re)started")
    plan = context.require_plan()
    return (
        f"vllm serve on {', '.join(names)}: TP {plan.tensor_parallel} x PP "
        f"{plan.pipeline_parallel}, executor {plan.executor}"
    )


def _launch(context: UpContext, node: NodePlan) -> None:
    """Start vLLM detached and wait until its pid file names a live process."""
    assert node.serve is not None
    _exec(context, node, launch_argv(node.serve, spec_id(node)), detach=True)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not _alive(context, node):
        if time.monotonic() > deadline:
            raise _died(context, node)
        time.sleep(0.2)


def _node(context: UpContext, name: str) -> NodePlan:
    return context.require_plan().node(name)


def wait_for_vllm(context: UpContext) -> str:
    plan = context.require_plan()
    head = plan.head
    api_key = context.inventory.secrets.api_key
    key = api_key.resolve() if api_key is not None else None
    port = context.inventory.ports.vllm

    def missing() -> str | None:
        dead = [n for n in serving_nodes(context) if not _alive(context, n)]
        if dead:
            raise _died(context, dead[0])
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


def _alive(context: UpContext, node: NodePlan) -> bool:
    return _exec(context, node, running_spec_argv()).exit_code == 0


def _log_tail(context: UpContext, node: NodePlan) -> str:
    assert node.serve is not None
    output = _exec(context, node, log_tail_argv(node.serve, LOG_LINES)).output
    return " | ".join(output.decode(errors="replace").strip().splitlines()) or "(empty)"


def _died(context: UpContext, node: NodePlan) -> VllmFailed:
    assert node.serve is not None
    full = _exec(context, node, log_tail_argv(node.serve, 200)).output.decode(errors="replace")
    cause = likely_cause(full)
    errors = " | ".join(error_lines(full)) or " | ".join(full.strip().splitlines()[-3:])
    summary = f"likely cause: {cause.summary}; " if cause else ""
    return VllmFailed(
        f"vLLM exited during start-up ({summary}errors: {errors or '(empty log)'})",
        where=node.name,
        fix=cause.fix if cause else "read the log with `vcluster logs --component vllm`",
    )
