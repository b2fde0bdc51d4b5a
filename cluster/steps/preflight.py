"""Step: the preflight checks over the gathered facts; any FAIL stops before a change."""

from __future__ import annotations

from cluster.decide.checks import CheckResult, Status, failed
from cluster.decide.plan import container_name
from cluster.errors import VclusterError
from cluster.nodes.containers import inspect_container
from cluster.nodes.preflight import preflight_results
from cluster.steps.context import UpContext
from cluster.steps.image_facts import learn_runtime


class PreflightFailed(VclusterError):
    """One or more checks failed; one line each."""

    def __init__(self, failures: list[CheckResult]) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} preflight check(s) failed", fix="see each line")

    def lines(self) -> list[str]:
        return [
            f"{r.node or 'cluster'}: {r.name}: {r.detail}"
            + (f" (fix: {r.remedy})" if r.remedy else "")
            for r in self.failures
        ]


def context_preflight_results(context: UpContext) -> list[CheckResult]:
    """Every preflight result for what `context` reaches: the image's facts and runtime are
    learnt first (`up` keeps them), and a head whose cluster container runs may hold its ports."""
    inventory = context.inventory
    session = context.session
    head = inventory.head.node_name
    running = False
    if head in session.connections:
        state = inspect_container(session.docker(head), container_name(inventory.cluster))
        running = state is not None and state.running
    learn_runtime(context)
    return preflight_results(
        inventory,
        session,
        context.host_facts,
        cluster_running_on_head=running,
        image_facts=context.image_facts,
        runtime=context.runtime,
        probe_error=context.image_error,
    )


def run_preflight(context: UpContext) -> str:
    results = context_preflight_results(context)
    for warning in (r for r in results if r.status is Status.WARN):
        context.reporter.note(
            f"  WARN {warning.node or 'cluster'}: {warning.name}: {warning.detail}"
        )
    failures = failed(results)
    if failures:
        raise PreflightFailed(failures)
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    return ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
