"""Step: one SSH connection per host, all opened at once; every unreachable host is named."""

from __future__ import annotations

from cluster.nodes.transport.fanout import FanOutError
from cluster.steps.context import UpContext


def connect_to_hosts(context: UpContext) -> str:
    outcome = context.session.open()
    if outcome.failed:
        raise FanOutError(outcome.failed, "connecting")
    return f"{len(outcome.succeeded)} host(s)"
