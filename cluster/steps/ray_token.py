"""Step: the cluster's Ray token exists on the controller before any container needs it.

Every Ray process of the cluster requires it (`RAY_AUTH_MODE=token`), so Ray runs nothing for
a client that lacks it. vcluster makes one per cluster unless the inventory gives one.
"""

from __future__ import annotations

from cluster.decide.inventory import generated_ray_token_path
from cluster.decide.secrets import ensure_token_file
from cluster.errors import VclusterError
from cluster.nodes.containers import inspect_container
from cluster.steps.context import UpContext


def ensure_ray_token(context: UpContext) -> str:
    inventory = context.inventory
    if not inventory.ray_token_is_generated:
        inventory.ray_token.resolve()  # a missing or empty secret stops here, with its fix
        return f"from {inventory.ray_token}"
    path = generated_ray_token_path(inventory.cluster)
    if not ensure_token_file(path):
        return f"{path} (owner-only)"
    head = context.require_plan().head
    state = inspect_container(context.session.docker(head.name), head.container.name)
    if state is not None and state.spec_hash == head.container.spec_hash:
        if not context.options.recreate:
            raise VclusterError(
                f"the cluster runs with a Ray token this controller does not have ({path} was "
                "missing, a new one was made now)",
                where=head.name,
                fix="copy the token file from the controller that started the cluster, or run "
                "`vcluster up --recreate` to restart the cluster with the new one",
            )
        context.recreate_all = True
    return f"made {path} (owner-only)"
