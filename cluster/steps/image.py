"""Step: the inventory's image on every node, with one image ID everywhere.

Missing on a node: pulled where a registry answers, otherwise streamed over SSH from a node that
has it, or from the controller's own Docker. Different IDs under one name: the run stops and
names the odd nodes (vcluster never overwrites an image it did not bring).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import docker

from cluster.errors import VclusterError
from cluster.images import (
    ImageError,
    copy_between_nodes,
    copy_from_controller,
    image_id,
    image_size,
    local_image_id,
    local_image_size,
    try_pull,
)
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
        _copy_to(context, image, missing, by_node)
        by_node.update(
            session.on_each(lambda node: found_on(session.docker(node)), missing).succeeded
        )
    _require_one_id(image, by_node)
    context.image_ids = {n: i for n, i in by_node.items() if i is not None}
    copied = f"; copied to {len(missing)} node(s)" if missing else ""
    where = "on every node" if nodes is None else f"on {', '.join(targets)}"
    return f"{image} {next(iter(context.image_ids.values()))[:19]} {where}{copied}"


def _copy_to(
    context: UpContext, image: str, missing: list[str], by_node: dict[str, str | None]
) -> None:
    session = context.session
    sources = [node for node, found in by_node.items() if found is not None]
    targets = ", ".join(missing)
    if sources:
        source = session.ssh(sources[0])
        size = image_size(session.docker(sources[0]), image)
        heading = f"copying {image}{_about(size)} from {sources[0]} to {targets}"
        with progress_board(context.reporter, heading) as board:
            outcome = session.on_each(
                lambda node: copy_between_nodes(source, session.ssh(node), image, board, size),
                missing,
            )
    elif local_image_id(image) is not None:
        size = local_image_size(image)
        heading = f"copying {image}{_about(size)} from this machine to {targets}"
        with progress_board(context.reporter, heading) as board:
            outcome = session.on_each(
                lambda node: copy_from_controller(session.ssh(node), image, board, size), missing
            )
    else:
        raise ImageError(
            f"image {image} is on no node, no registry serves it, and this machine lacks it",
            where=", ".join(missing),
            fix="load it on one node (docker load) or here, or push it to a registry the nodes reach",
        )
    context.changes.append(f"image copied to {', '.join(missing)}")
    outcome.raise_if_failed(f"copying {image}")


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
