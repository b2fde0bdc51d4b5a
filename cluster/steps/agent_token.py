"""Step: with several models, the cluster's agent token exists on the controller before any
container needs it (the router uses it with every agent; the models' API servers take it as
their key). vcluster makes it; a new one restarts the cluster's containers, so all share it.
"""

from __future__ import annotations

from cluster.decide.plan import agent_token_path
from cluster.decide.secrets import ensure_token_file
from cluster.nodes.containers import inspect_container
from cluster.steps.context import UpContext


def ensure_agent_token(context: UpContext) -> str:
    if not context.require_plan().routed:
        return "not applicable: one model (the router in front of it starts no ranks)"
    path = agent_token_path(context.inventory.cluster)
    if not ensure_token_file(path):
        return f"{path} (owner-only)"
    head = context.require_plan().head
    if inspect_container(context.session.docker(head.name), head.container.name) is not None:
        context.recreate_all = True  # the running containers hold another token
        return f"made {path} (owner-only); the containers restart with it"
    return f"made {path} (owner-only)"
