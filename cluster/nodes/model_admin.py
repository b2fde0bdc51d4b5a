"""`vcluster models`: the router's view of every model, and loading or unloading one by hand.

The router is reached through `docker exec` in the head container (its Unix socket), so this
needs SSH to the head, not the API key.
"""

from __future__ import annotations

import docker

from cluster.decide.inventory import Inventory
from cluster.decide.plan import SUPERVISOR_STATE_DIR, container_name
from cluster.errors import UsageError, VclusterError
from cluster.nodes.router_client import (
    ModelStatus,
    RouterReply,
    call_router,
    parse_models_report,
    router_path,
)
from cluster.nodes.session import Session


class RouterUnavailable(VclusterError):
    """The head's router did not answer."""


def models_report(inventory: Inventory, session: Session) -> tuple[ModelStatus, ...]:
    """Every model's state, GPUs, use and activations, as the router reports them."""
    reply = _call(inventory, session, "GET", router_path("models"))
    return parse_models_report(_ok(reply, inventory).data)


def load_model(inventory: Inventory, session: Session, name: str, wait_s: float) -> ModelStatus:
    """Load `name` now (evicting idle models if need be) and wait up to `wait_s` for it."""
    _known(inventory, name)
    reply = _call(
        inventory, session, "POST", router_path("load", model=name, wait=wait_s), wait_s + 30
    )
    if reply.status != 200:
        raise VclusterError(
            reply.message,
            where=inventory.head.node_name,
            fix="see the model's log: `vcluster exec INVENTORY -- tail /var/log/vcluster-models/*`"
            if reply.status == 502
            else "run `vcluster models INVENTORY` to see what holds the GPUs",
        )
    return parse_models_report({"models": [reply.data]})[0]


def unload_model(inventory: Inventory, session: Session, name: str) -> ModelStatus:
    """Stop every rank of `name` (requests in flight to it fail)."""
    _known(inventory, name)
    reply = _call(inventory, session, "POST", router_path("unload", model=name))
    return parse_models_report({"models": [_ok(reply, inventory).data]})[0]


def _ok(reply: RouterReply, inventory: Inventory) -> RouterReply:
    if reply.status != 200:
        raise RouterUnavailable(
            f"the router answered {reply.status}: {reply.message}",
            where=inventory.head.node_name,
            fix="run `vcluster up INVENTORY`: the router may run another inventory's models",
        )
    return reply


def _known(inventory: Inventory, name: str) -> None:
    if not inventory.routed:
        raise UsageError(
            "this cluster serves one model, always: its container's supervisor keeps it loaded",
            fix="`vcluster models INVENTORY` shows it; list several models under models: "
            "to load and unload them",
        )
    names = [m.served for m in inventory.model_list]
    if name not in names:
        raise UsageError(
            f"no model {name!r} in {inventory.source}", fix=f"use one of: {', '.join(names)}"
        )


def _call(
    inventory: Inventory, session: Session, method: str, path: str, timeout_s: float = 30.0
) -> RouterReply:
    head = inventory.head.node_name
    name = container_name(inventory.cluster)
    try:
        container = session.docker(head).containers.get(name)
    except docker.errors.NotFound:
        raise RouterUnavailable(
            f"no container {name} on the head", where=head, fix="run `vcluster up INVENTORY`"
        ) from None
    reply = call_router(container, SUPERVISOR_STATE_DIR, method, path, timeout_s)
    if reply.status == 0:
        raise RouterUnavailable(
            f"the router does not answer ({reply.message})",
            where=head,
            fix="run `vcluster up INVENTORY` (it starts the router), then try again",
        )
    return reply
