"""Step: the inventory's image on every node, with one image ID everywhere.

Missing on a node: pulled where a registry answers, otherwise sent through a chain of the nodes
that lack it (cluster/distribution): this machine reads it once, from a node that has it or from
its own Docker, and each node loads it while it passes it on. Different IDs under one name: the run stops and
names the odd nodes (vcluster never overwrites an image it did not bring).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import docker

from cluster.errors import VclusterError
from cluster.nodes.images import (
    ImageError,
    image_id,
    image_size,
    local_image_id,
    local_image_size,
    saved_here,
    saved_on_node,
    try_pull,
)
from cluster.nodes.transfer import chain_nodes, send_image
from cluster.progress import format_bytes
from cluster.steps.base import progress_board
from cluster.steps.context import UpContext


class ImageMismatch(VclusterError):
    """Nodes hold different images under the inventory's image name."""


def ensure_image(context: UpContext) -> str:
    """The inventory's image on every node (pulled or copied where missing), one ID everywhere;
    on the head alone when the nodes will run a Ray-ready image derived from it there."""
    runtime = context.runtime
    if runtime is not None and runtime.image != context.inventory.image:
        head = context.inventory.head.node_name
        return place_image(context, context.inventory.image, nodes=[head]) + " (the head)"
    return place_image(context, context.inventory.image)


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
    missing = [node for node, found in by_node.items() if found is None]
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
    _require_one_id(image, by_node)
    context.image_ids = {n: i for n, i in by_node.items() if i is not None}
    copied = f"; copied to {len(missing)} node(s)" if missing else ""
    where = "on every node" if nodes is None else f"on {', '.join(targets)}"
    return f"{image} {next(iter(context.image_ids.values()))[:19]} {where}{copied}"


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
    if sources:
        size = image_size(session.docker(sources[0]), image)
        save = functools.partial(saved_on_node, session.ssh(sources[0]), image)
        origin = sources[0]
    elif local_image_id(image) is not None:
        size = local_image_size(image)
        save = functools.partial(saved_here, image)
        origin = "this machine"
    else:
        raise ImageError(
            f"image {image} is on no node, no registry serves it, and this machine lacks it",
            where=", ".join(missing),
            fix="load it on one node (docker load) or here, or push it to a registry the nodes reach",
        )
    addresses = {n.name: n.facts.address for n in context.plan.nodes} if context.plan else {}
    chain = [
        n
        for n in chain_nodes(context.inventory, session, addresses, reachable_only=True)
        if n.name in missing
    ]

    def lacks(node: str) -> bool:
        return found_on(session.docker(node)) is None

    heading = f"sending {image}{_about(size)} from {origin} through {', '.join(missing)}"
    with progress_board(context.reporter, heading) as board:
        outcome = send_image(chain, image, save, lacks, board)
    if outcome.failed:
        raise ImageError(
            f"{image} did not reach every node: "
            + "; ".join(f"{node}: {why}" for node, why in outcome.failed.items()),
            where=", ".join(outcome.failed),
            fix="check free disk space under those nodes' Docker data root, then run `vcluster up` again",
        )
    context.changes.append(
        f"image sent to {', '.join(missing)} ({format_bytes(outcome.bytes_sent)} from {origin})"
    )


def _about(size: int | None) -> str:
    return f" (about {format_bytes(size)})" if size else ""


def _require_one_id(image: str, by_node: dict[str, str | None]) -> None:
    counts = Counter(v for v in by_node.values() if v is not None)
    if len(counts) <= 1:
        return
    common = counts.most_common(1)[0][0]
    odd = {node: found for node, found in by_node.items() if found != common}
    detail = ", ".join(f"{node} has {found[:19]}" for node, found in odd.items() if found)
    raise ImageMismatch(
        f"{image} is a different image on some nodes ({detail}; the others {common[:19]})",
        where=", ".join(odd),
        fix=f"remove it there (docker rmi {image}) and run `vcluster up` again to copy the right one",
    )
