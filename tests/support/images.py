"""Images the sandbox builds, put on a running sandbox's nodes the way `sandbox up` puts its own."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cluster.decide.inventory import load_inventory
from cluster.nodes.session import Session
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import build_images, image_id
from cluster.sandbox.transfer import image_to_nodes


def put_on_nodes(inventory_path: Path, image: str) -> str:
    """Build the sandbox images if needed, stream `image` to every node lacking it; its ID."""
    local = ensure_local_docker()
    build_images(docker=local)
    wanted = image_id(local, image)
    assert wanted is not None, f"{image} was not built"
    inventory = load_inventory(inventory_path)
    with contextlib.closing(Session(inventory)) as session:
        session.open().raise_if_failed("connecting")
        connections = [session.ssh(n.node_name) for n in inventory.nodes]
        image_to_nodes(local, connections, image, wanted, progress=lambda _: None)
    return wanted
