"""Step: the inventory's image on every node, with one image ID everywhere.

Missing on a node: pulled where a registry answers, otherwise sent through a chain of the nodes
that lack it (cluster/nodes/transfer.py): this machine reads it once, from a node that has it or
from its own Docker, and each node loads it while it passes it on. Which nodes lack it is decided
by cluster/decide/up/images.py; different IDs under one name stop the run before anything moves,
naming the odd nodes (vcluster never overwrites an image it did not bring).
"""

from __future__ import annotations

from collections.abc import Callable

import docker

from cluster.decide.up.images import (
    ImageMismatch,
    decide_image,
    image_targets,
    require_one_id,
)
from cluster.nodes.images import (
    ImageError,
    image_id,
    node_layers,
    source_here,
    source_on_node,
    try_pull,
)
from cluster.nodes.transfer import chain_nodes, send_image
from cluster.progress import format_bytes
from cluster.steps.base import progress_board
from cluster.steps.context import UpContext

__all__ = ["ImageMismatch", "ensure_image", "place_image"]


def ensure_image(context: UpContext) -> str:
    """The inventory's image on every node (pulled or copied where missing), one ID everywhere;
    on the head alone when the nodes will run a Ray-ready image derived from it there."""
    inventory = context.inventory
    head = inventory.head.node_name
    connected = list(context.session.connections)
    targets = image_targets(inventory.image, context.runtime, head, connected)
    if list(targets) == connected:
        return place_image(context, inventory.image)
    return place_image(context, inventory.image, nodes=list(targets)) + " (the head)"


def place_image(
    context: UpContext,
    image: str,
    *,
    pull: bool = True,
    present: Callable[[docker.DockerClient], str | None] | None = None,
    nodes: list[str] | None = None,
) -> str:
    """`image` on every node (or `nodes`) with one ID; `present` says a node's ID of it (None:
    missing)."""
    session = context.session
    found_on = present or (lambda client: image_id(client, image))
    targets = nodes if nodes is not None else list(session.connections)
    ids = session.on_each(lambda node: found_on(session.docker(node)), targets).values()
    by_node = dict(zip(targets, ids, strict=True))
    missing = list(decide_image(image, by_node).missing)
    if missing and pull:
        context.reporter.progress(f"{image} missing on {', '.join(missing)}: pulling")
        pulled = session.on_each(lambda node: try_pull(session.docker(node), image), missing)
        by_node.update({n: v for n, v in pulled.succeeded.items() if v is not None})
        missing = [node for node in missing if by_node[node] is None]
    if missing:
        _copy_to(context, image, missing, by_node, found_on)
        by_node.update(
            session.on_each(lambda node: found_on(session.docker(node)), missing).succeeded
        )
    require_one_id(image, by_node)
    image_ids = [i for i in by_node.values() if i is not None]
    copied = f"; copied to {len(missing)} node(s)" if missing else ""
    where = "on every node" if nodes is None else f"on {', '.join(targets)}"
    return f"{image} {image_ids[0][:19]} {where}{copied}"


def _copy_to(
    context: UpContext,
    image: str,
    missing: list[str],
    by_node: dict[str, str | None],
    found_on: Callable[[docker.DockerClient], str | None],
) -> None:
    """Send `image` to the `missing` nodes through a chain: this machine reads it once (from
    its own Docker, or from a node that has it) and each node passes it on as it loads it."""
    session = context.session
    sources = [node for node, found in by_node.items() if found is not None]
    source = (
        source_on_node(sources[0], session.ssh(sources[0]), session.docker(sources[0]), image)
        if sources
        else source_here(image)
    )
    if source is None:
        raise ImageError(
            f"image {image} is on no node, no registry serves it, and this machine lacks it",
            where=", ".join(missing),
            fix="load it on one node (docker load) or here, or push it to a registry the nodes reach",
        )
    addresses = {name: facts.address for name, facts in context.node_facts.items()}
    chain = [
        n
        for n in chain_nodes(context.inventory, session, addresses, reachable_only=True)
        if n.name in missing
    ]

    def lacks(node: str) -> bool:
        return found_on(session.docker(node)) is None

    origin = source.origin
    heading = (
        f"sending {image}{_about(source.layers.size)} from {origin} through {', '.join(missing)}"
    )
    with progress_board(context.reporter, heading) as board:
        outcome = send_image(
            chain, image, source, lacks, lambda node: node_layers(session.docker(node)), board
        )
    if outcome.failed:
        raise ImageError(
            f"{image} did not reach every node: "
            + "; ".join(f"{node}: {why}" for node, why in outcome.failed.items()),
            where=", ".join(outcome.failed),
            fix="check free disk space under those nodes' Docker data root, then run `vcluster up` again",
        )
    carried = f"{outcome.first_round.describe()}, " if outcome.first_round else ""
    context.changes.append(
        f"image sent to {', '.join(missing)} ({carried}{format_bytes(outcome.bytes_sent)} from {origin})"
    )


def _about(size: int | None) -> str:
    return f" (about {format_bytes(size)})" if size else ""
