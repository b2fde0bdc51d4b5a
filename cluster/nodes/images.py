"""Images on nodes without a registry: what a node or this machine holds (images, and their
layers by chain), and `docker save` streams of it, read once and sent through the chain of nodes
(cluster/nodes/transfer.py), as an air-gapped site moves images; nothing is written to disk on
the way. A save can leave out the layers every receiving node has (the relay's `save` mode on a
node, the same filter here).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import docker
import docker.errors

from cluster.decide.layers import (
    ImageLayers,
    NodeLayers,
    in_containerd_store,
    parse_image_layers,
    parse_node_layers,
)
from cluster.errors import VclusterError
from cluster.nodes.transport.ssh import SshConnection
from cluster.remote import relay
from cluster.remote.registry import RELAY, source

T = TypeVar("T")


class ImageError(VclusterError):
    """An image could not be found, pulled or copied."""


def image_id(client: docker.DockerClient, image: str) -> str | None:
    """The ID of `image` on this Docker engine, or None when it is not there."""
    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        return None


def try_pull(client: docker.DockerClient, image: str) -> str | None:
    """Pull `image`; its ID, or None when no registry has it (air-gapped nodes)."""
    try:
        return client.images.pull(image).id
    except docker.errors.APIError:
        return None


def _on_local_docker(action: Callable[[docker.DockerClient], T]) -> T | None:
    try:
        client = docker.from_env(timeout=30)
    except docker.errors.DockerException:
        return None
    with contextlib.closing(client):
        return action(client)


SAVE_CHUNK = 1 << 20


def saved_here(image: str) -> Iterator[bytes]:
    """`docker save` of `image` in the controller's own Docker, chunk by chunk."""
    with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        yield from iter(lambda: save.stdout.read(SAVE_CHUNK), b"")  # type: ignore[union-attr]
    if save.returncode != 0:
        raise ImageError(f"`docker save {image}` failed here (exit {save.returncode})")


def image_layers(client: docker.DockerClient, image: str) -> ImageLayers | None:
    """`image`'s ID, layers and their sizes on this engine, or None when it is not there."""
    try:
        return parse_image_layers(client.api.inspect_image(image), client.api.history(image))
    except docker.errors.ImageNotFound:
        return None


def node_layers(client: docker.DockerClient) -> NodeLayers:
    """The layers of every image on this engine (by chain), and where it keeps its data."""
    ids = dict.fromkeys(client.api.images(all=True, quiet=True))
    inspects = []
    for image in ids:
        with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile
            inspects.append(client.api.inspect_image(image))
    return parse_node_layers(inspects, client.info())


SaveWithout = Callable[[Sequence[str]], Iterator[bytes]]
"""`docker save` of the image without the layers (diff IDs) given, chunk by chunk."""


@dataclass(frozen=True)
class ImageSource:
    """Where this machine reads an image for the chain: a node that has it, or its own Docker."""

    origin: str
    """The node's name, or `this machine`."""
    layers: ImageLayers
    save: SaveWithout
    whole_only: bool = False
    """Its Docker keeps images in containerd's store: its save names gzip-compressed layers
    by their compressed digest, so no layer is left out and each file is checked by name."""


def source_on_node(
    name: str,
    connection: SshConnection,
    client: docker.DockerClient,
    image: str,
    docker_host: str | None = None,
) -> ImageSource | None:
    """`image` as read from node `name`, or None when it is not there."""
    layers = image_layers(client, image)
    if layers is None:
        return None

    def save(drop: Sequence[str]) -> Iterator[bytes]:
        return saved_on_node_without(connection, image, layers, drop, docker_host)

    return ImageSource(name, layers, save, whole_only=in_containerd_store(client.info()))


def source_here(image: str) -> ImageSource | None:
    """`image` as read from this machine's own Docker, or None when it is not there."""
    found = _on_local_docker(lambda client: (image_layers(client, image), client.info()))
    if found is None or found[0] is None:
        return None
    layers, info = found[0], found[1]

    def save(drop: Sequence[str]) -> Iterator[bytes]:
        return relay.filtered_save(saved_here(image), list(drop), list(layers.diff_ids))

    return ImageSource("this machine", layers, save, whole_only=in_containerd_store(info))


def saved_on_node_without(
    node: SshConnection,
    image: str,
    layers: ImageLayers,
    drop: Sequence[str],
    docker_host: str | None = None,
) -> Iterator[bytes]:
    """`docker save` of `image` on a node without the layers `drop`, filtered there by the
    relay's `save` mode: only what the chain needs crosses the network."""
    config = {
        "mode": "save",
        "image": image,
        "drop": list(drop),
        "diff_ids": list(layers.diff_ids),
        "docker_host": docker_host,
    }
    channel = node.open_channel(["python3", "-c", source(RELAY)])
    try:
        channel.sendall((json.dumps(config) + "\n").encode())
        channel.shutdown_write()
        yield from iter(lambda: channel.recv(SAVE_CHUNK), b"")
        status = channel.recv_exit_status()
        errors = b""
        while channel.recv_stderr_ready():
            errors += channel.recv_stderr(SAVE_CHUNK)
    finally:
        channel.close()
    if status != 0:
        detail = errors.decode(errors="replace").strip()[-300:]
        raise ImageError(
            f"`docker save {image}` failed on {node.target.name} (exit {status}): {detail}",
            where=node.target.label,
            fix="check the image there with `docker image inspect`; the host needs python3",
        )
