"""Images the sandbox builds, put on a running sandbox's nodes the way `sandbox up` puts its own.

An image built on one the nodes hold already (the image without Ray is the workload image and
one small layer) is sent thin: `docker save`'s archive without the files of the layers the
nodes have, which `docker load` skips by their IDs (it reads only the layers it lacks). The IDs
on every node are checked after; should a node's Docker refuse the thin archive, the whole
image is streamed, as `sandbox up` does.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

from cluster.decide.inventory import load_inventory
from cluster.nodes.session import Session
from cluster.nodes.transport.ssh import SshConnection
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import WORKLOAD_IMAGE, build_images, image_id
from cluster.sandbox.transfer import image_archive, image_to_nodes, remote_image_id


def put_on_nodes(inventory_path: Path, image: str, base: str = WORKLOAD_IMAGE) -> str:
    """Build the sandbox images if needed, put `image` on every node lacking it; its ID.

    `base`: an image every node holds, whose layers `image` starts with (sent thin then)."""
    local = ensure_local_docker()
    build_images(docker=local)
    wanted = image_id(local, image)
    assert wanted is not None, f"{image} was not built"
    inventory = load_inventory(inventory_path)
    with contextlib.closing(Session(inventory)) as session:
        session.open().raise_if_failed("connecting")
        connections = [session.ssh(n.node_name) for n in inventory.nodes]
        lacking = [c for c in connections if remote_image_id(c, image) != wanted]
        if lacking:
            archive, _ = image_archive(local, image, wanted)
            base_archive, _ = image_archive(local, base, str(image_id(local, base)))
            thin = thin_archive(archive, skip=layer_files(base_archive))
            for connection in lacking:
                _thin_load(connection, thin)
        image_to_nodes(local, connections, image, wanted, progress=lambda _: None)
    return wanted


def layer_files(archive: Path) -> set[str]:
    """The layer files an archive of `docker save` names in its manifest."""
    with tarfile.open(archive) as tar:
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        return {layer for entry in json.load(manifest) for layer in entry["Layers"]}


def thin_archive(archive: Path, skip: set[str]) -> bytes:
    """`archive` less the layer files in `skip` (their folders' other files are kept)."""
    thin = io.BytesIO()
    with tarfile.open(archive) as source, tarfile.open(fileobj=thin, mode="w") as target:
        for member in source:
            if member.name in skip:
                continue
            target.addfile(member, source.extractfile(member) if member.isfile() else None)
    return thin.getvalue()


def _thin_load(connection: SshConnection, thin: bytes) -> None:
    """Load the thin archive; a refusal is left to the full stream that follows."""
    connection.run(["docker", "load"], stdin=thin, timeout=300)
