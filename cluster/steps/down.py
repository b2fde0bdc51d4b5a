"""`vcluster down`: stop vLLM, Ray and the containers on every reachable node, in parallel,
then remove the cluster's firewall chain there.

Idempotent: a node without the container is fine. The model cache is never touched; images
stay unless asked. Unreachable nodes are named, and the exit code says the job is incomplete.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import docker.errors

from cluster.decide.inventory import Inventory
from cluster.decide.plan import container_name
from cluster.decide.ray_image import SOURCE_LABEL
from cluster.nodes.containers import remove_container
from cluster.nodes.lock import ClusterLock
from cluster.nodes.session import Session
from cluster.nodes.transport.fanout import FanOutError
from cluster.steps.base import Reporter, Step, run_steps
from cluster.steps.firewall import remove_firewall


@dataclass
class DownContext:
    inventory: Inventory
    session: Session
    remove_images: bool
    removed: dict[str, bool]


def _connect(context: DownContext) -> str:
    outcome = context.session.open()
    reached = len(outcome.succeeded)
    return f"{reached} of {len(context.inventory.nodes)} host(s)" + (
        f"; unreachable: {', '.join(outcome.failed)}" if outcome.failed else ""
    )


def _remove(context: DownContext) -> str:
    name = container_name(context.inventory.cluster)
    image = context.inventory.image

    def on_node(node: str) -> bool:
        client = context.session.docker(node)
        removed = remove_container(client, name)
        if context.remove_images:
            # the Ray-ready images vcluster derived from it first: they are its children
            derived = client.images.list(filters={"label": f"{SOURCE_LABEL}={image}"})
            for found in [*derived, image]:
                with contextlib.suppress(docker.errors.ImageNotFound):
                    client.images.remove(found if isinstance(found, str) else found.id, force=True)
        return removed

    outcome = context.session.on_each(on_node)
    outcome.raise_if_failed("removing containers")
    context.removed = outcome.succeeded
    gone = [n for n, removed in context.removed.items() if removed]
    absent = [n for n, removed in context.removed.items() if not removed]
    parts = []
    if gone:
        parts.append(f"removed on {', '.join(gone)}")
    if absent:
        parts.append(f"none on {', '.join(absent)}")
    if context.remove_images:
        parts.append(f"image {image} (and the Ray-ready images derived from it) removed")
    return "; ".join(parts) or "nothing to do"


def _remove_firewall(context: DownContext) -> str:
    """The cluster's chain off every reached node, after its ports closed (docs/firewall.md)."""
    return remove_firewall(context.inventory, context.session)


def down(inventory: Inventory, reporter: Reporter, *, remove_images: bool = False) -> None:
    """Remove the cluster's containers everywhere; raise naming unreachable nodes, if any."""
    with Session(inventory) as session:
        context = DownContext(inventory, session, remove_images, {})
        run_steps([Step("Connecting to the hosts", _connect)], context, reporter)
        head = inventory.head.node_name
        lock = (
            ClusterLock(session.ssh(head), inventory.cluster, "down")
            if head in session.connections
            else contextlib.nullcontext()
        )
        with lock:
            if session.connections:
                steps = [
                    Step("Removing vLLM, Ray and the containers", _remove),
                    Step("Removing the firewall", _remove_firewall),
                ]
                run_steps(steps, context, reporter)
        if session.failed:
            raise FanOutError(session.failed, "reaching hosts (their containers may remain)")
